"""Multi-token-prediction (MTP) layers: a tiny DeepSeek-V3 with one MTP layer.

DeepSeek-V3 and GLM-4.5 store MTP layers after the trunk (`model.layers.{num_hidden_layers
+ i}`). vLLM's MTP drafter builds them from the same config, so they get the pruned
count too; their experts are chosen by AIMER on their own weights (the natural choice:
no calibration, and the layer is scored like any other). They are not trunk layers:
the ratio, the uniform count and the authors' pruned_experts.json (which never has
them) are about the trunk. Expected values come from tests/helpers/reference.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.reference import (load_tensors, reference_pruned, reference_scores,
                                     slice_checkpoint)
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.constraints import Deployment
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import expert_layout
from vllm_aimer.plan import make_plan, read_plan
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.weights import PrunedWeights

TRUNK_LAYERS = 4  # layer 0 dense, 1-3 MoE, layer 4 the MTP layer


@pytest.fixture(scope="module")
def mtp(tiny_checkpoint):
    model = tiny_checkpoint("deepseek_v3", mtp_layers=1)
    ckpt = open_checkpoint(model)
    return model, ckpt, expert_layout(ckpt)


@pytest.fixture(scope="module")
def want(mtp):
    model = mtp[0]
    return reference_pruned(reference_scores(model), 0.5, n_group=4, mtp_from=TRUNK_LAYERS)


def test_mtp_layer_is_found_apart_from_the_trunk(mtp):
    _, _, layout = mtp
    assert layout.layers == (1, 2, 3) and layout.mtp_layers == (4,)


def test_scored_plan_prunes_the_mtp_layer_by_its_own_scores(mtp, want):
    _, ckpt, layout = mtp
    plan = make_plan(layout, score_checkpoint(ckpt, layout, progress=False).scores, 0.5,
                     ckpt.fingerprint)
    # k comes from the 3 trunk layers (0.5 x 48 = 24 -> 8 per layer); the MTP layer loses 8.
    assert plan.layer_ids == [1, 2, 3] and plan.mtp_layer_ids == [4]
    assert plan.total_pruned == 24 and plan.pruned_per_layer == 8
    assert {layer: plan.layer(layer).pruned for layer in (1, 2, 3, 4)} == want
    # The authors' format stays trunk-only; the plan's identity covers the MTP layer.
    assert sorted(plan.pruned_experts()) == ["1", "2", "3"]
    other = plan.model_copy(update={"mtp_layers": {}})
    assert other.plan_hash != plan.plan_hash


def test_stream_slices_the_mtp_layer_like_the_reference(mtp, want, tmp_path):
    model, ckpt, layout = mtp
    plan = make_plan(layout, score_checkpoint(ckpt, layout, progress=False).scores, 0.5,
                     ckpt.fingerprint)
    got = dict(PrunedWeights(ckpt, layout, plan))
    ref = load_tensors(slice_checkpoint(model, tmp_path / "sliced", want))
    assert sorted(got) == sorted(ref)
    assert any(".layers.4.mlp.experts.7." in n for n in got)
    assert not any(".layers.4.mlp.experts.8." in n for n in got)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_a_plan_file_without_the_mtp_layer_gets_it_scored(mtp, want, tmp_path):
    """The authors' pruned_experts.json names trunk layers only: the loader scores the
    MTP layer (and only it) and prunes the same count there."""
    from vllm_aimer.loader import AimerModelLoader
    from vllm.config.load import LoadConfig

    _, ckpt, layout = mtp
    path = tmp_path / "pruned_experts.json"
    path.write_text(json.dumps({str(l): want[l] for l in (1, 2, 3)}))
    assert read_plan(path, layout, ckpt.fingerprint).mtp_layers == {}
    loader = AimerModelLoader(LoadConfig(model_loader_extra_config={"plan": str(path)}))
    decision = loader._plan_from_file(str(path), ckpt, layout, Deployment())
    assert decision.source == "plan_file" and decision.plan.layer(4).pruned == want[4]
    assert decision.seconds > 0  # the MTP layer was scored
    # A plan file that does name the MTP layer is taken as it is.
    path.write_text(json.dumps({str(l): want[l] for l in (1, 2, 3)} | {"4": list(range(0, 16, 2))}))
    assert read_plan(path, layout, ckpt.fingerprint).layer(4).pruned == list(range(0, 16, 2))


def test_a_plan_naming_a_layer_past_the_mtp_layers_is_refused(mtp, want, tmp_path):
    _, ckpt, layout = mtp
    path = tmp_path / "pruned_experts.json"
    path.write_text(json.dumps({str(l): want[l] for l in (1, 2, 3)} | {"5": want[1]}))
    with pytest.raises(AimerError, match="different checkpoint") as e:
        read_plan(path, layout, ckpt.fingerprint)
    assert "MTP layers [4]" in str(e.value)


def test_expert_tensors_beyond_the_config_are_refused(tiny_checkpoint, tmp_path):
    """An MTP layer the config does not declare means the config does not describe
    the weights: refused rather than scored as a trunk layer."""
    import shutil

    model = tiny_checkpoint("deepseek_v3", mtp_layers=1)
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(AimerError, match=r"layer\(s\) \[4\].*num_hidden_layers=4"):
        expert_layout(open_checkpoint(copy))


def test_a_plan_that_leaves_out_the_mtp_layer_cannot_be_streamed(mtp, want, tmp_path):
    """Every way to a plan (file, cache, the target's) ends in PlanMap, which refuses a
    pruning plan that does not name every MoE layer: the MTP layer would otherwise
    stream all 16 experts and an unsliced router into a layer built with 8."""
    _, ckpt, layout = mtp
    path = tmp_path / "pruned_experts.json"
    path.write_text(json.dumps({str(l): want[l] for l in (1, 2, 3)}))
    trunk_only = read_plan(path, layout, ckpt.fingerprint)
    with pytest.raises(AimerError, match=r"does not name MoE layers \[4\]"):
        PrunedWeights(ckpt, layout, trunk_only)
