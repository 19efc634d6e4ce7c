"""Pruning plans: the uniform count, the selection rule, determinism and plan files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.reference import reference_k, reference_pruned, reference_scores
from vllm_aimer.architectures import ARCHITECTURES
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.constraints import Router, check_ratio
from vllm_aimer.constraints import prune_count as _prune_count
from vllm_aimer.plan import make_plan, read_plan
from vllm_aimer.scoring import score_checkpoint

CLI = [sys.executable, "-m", "vllm_aimer.cli"]


def prune_count(layers: int, experts: int, top_k: int, ratio, n_group: int = 1,
                topk_group: int = 1) -> int:
    return _prune_count(layers, Router(experts, top_k, n_group, topk_group), ratio)


def synthetic_layout(num_layers: int, num_experts: int, top_k: int,
                     first_layer: int = 0) -> ExpertLayout:
    layers = tuple(range(first_layer, first_layer + num_layers))
    return ExpertLayout(arch=ARCHITECTURES[0], num_experts=num_experts, top_k=top_k,
                        layers=layers, scored={}, expert_bytes={})


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    """(directory, checkpoint, layout, package scores) of the default tiny Qwen3-MoE."""
    model = tiny_checkpoint("qwen3_moe")
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    return model, ckpt, layout, score_checkpoint(ckpt, layout, progress=False).scores


# --------------------------------------------------------------------------- prune_count

@pytest.mark.parametrize("layers, experts, top_k, ratio, k", [
    (4, 16, 2, 0.5, 8),        # target 32 -> exactly 8 per layer
    (4, 16, 2, 0.25, 4),
    (3, 10, 2, 0.25, 3),       # target round(7.5) = 8: 9 (k=3) is closer than 6 (k=2)
    (4, 16, 2, 10 / 64, 2),    # target 10: 8 (k=2) and 12 (k=3) tie -> smaller k
    (2, 8, 1, 5 / 16, 2),      # target 5: 4 and 6 tie -> 2
    (4, 16, 2, 0.3, 5),        # target round(19.2) = 19: 20 is closer than 16
    (4, 16, 2, 0.01, 0),       # target 1: 0 is closer than 4
    (1, 64, 8, 0.5, 32),
    (48, 128, 8, 0.25, 32),
    (16, 64, 8, 0.875, 56),    # exactly the top_k floor
])
def test_prune_count_examples(layers, experts, top_k, ratio, k):
    assert prune_count(layers, experts, top_k, ratio) == k


@pytest.mark.parametrize("layers, experts", [(1, 8), (4, 16), (48, 128)])
def test_ratio_zero_prunes_nothing(layers, experts):
    assert prune_count(layers, experts, 2, 0.0) == 0
    assert prune_count(layers, experts, 2, 0) == 0


def test_prune_count_matches_brute_force():
    """Every (layers, experts, ratio) on a grid against the brute-force definition."""
    checked = 0
    for layers in (1, 2, 3, 5, 7, 24):
        for experts in (4, 6, 16, 60, 64):
            top_k = 2
            for i in range(100):
                ratio = i / 100
                want = reference_k(layers, experts, ratio)
                if experts - want < top_k:
                    with pytest.raises(AimerError):
                        prune_count(layers, experts, top_k, ratio)
                else:
                    assert prune_count(layers, experts, top_k, ratio) == want, (layers, experts, ratio)
                checked += 1
    assert checked == 3000


@pytest.mark.parametrize("layers, experts, top_k, ratio", [
    (4, 16, 2, 0.95), (4, 16, 8, 0.6), (24, 64, 6, 0.95), (2, 128, 8, 0.99)])
def test_top_k_floor_names_the_largest_ratio(layers, experts, top_k, ratio):
    with pytest.raises(AimerError) as e:
        prune_count(layers, experts, top_k, ratio)
    msg = str(e.value)
    assert f"top_k={top_k}" in msg
    kept = experts - reference_k(layers, experts, ratio)
    assert f"keep {kept} of {experts}" in msg
    m = re.search(r"at most ([0-9.]+)", msg)
    assert m, msg
    suggested = float(m[1])
    assert suggested == pytest.approx((experts - top_k) / experts, abs=1e-4)
    # The suggested ratio is accepted and keeps exactly top_k experts per layer.
    assert experts - prune_count(layers, experts, top_k, suggested) == top_k


# --------------------------------------------------------------------------- selection

def test_highest_scores_are_pruned_with_ties_to_lower_ids():
    layout = synthetic_layout(2, 6, 2)
    scores = {0: [0.5, 0.9, 0.9, 0.7, 0.9, 0.1],
              1: [0.8, 0.8, 0.8, 0.8, 0.8, 0.8]}
    # ratio 2/6 -> 4 of 12 -> k = 2; ratio 0.5 -> k = 3
    plan = make_plan(layout, scores, 2 / 6, "f" * 64)
    assert plan.layer(0).pruned == [1, 2]
    assert plan.layer(1).pruned == [0, 1]
    assert plan.layer(0).kept == [0, 3, 4, 5]
    plan = make_plan(layout, scores, 0.5, "f" * 64)
    assert plan.layer(0).pruned == [1, 2, 4]
    assert plan.layer(1).pruned == [0, 1, 2]
    assert plan.layer(1).kept == [3, 4, 5]


def test_random_scores_prune_the_k_highest():
    rng = np.random.default_rng(7)
    layout = synthetic_layout(5, 32, 4, first_layer=3)
    scores = {layer: rng.uniform(0.6, 0.9, 32).round(2).tolist() for layer in layout.layers}
    for ratio in (0.1, 0.25, 0.5, 0.8):
        k = reference_k(5, 32, ratio)
        plan = make_plan(layout, scores, ratio, "a" * 64)
        want = reference_pruned(scores, k=k)
        assert plan.layer_ids == [3, 4, 5, 6, 7]
        for layer in layout.layers:
            lp = plan.layer(layer)
            assert lp.pruned == want[layer]
            assert lp.kept == [e for e in range(32) if e not in want[layer]]
            # every pruned score >= every kept score
            assert min(scores[layer][e] for e in lp.pruned) >= max(
                scores[layer][e] for e in lp.kept)


def test_tiny_checkpoint_plan_prunes_highest_reference_scores(qwen):
    model, ckpt, layout, scores = qwen
    ref = reference_scores(model)
    for ratio in (0.25, 0.5, 0.875):
        plan = make_plan(layout, scores, ratio, ckpt.fingerprint)
        assert plan.pruned_experts() == {str(layer): ids for layer, ids in
                                         reference_pruned(ref, k=reference_k(4, 16, ratio)).items()}
        assert plan.kept_per_layer == 16 - reference_k(4, 16, ratio)
        assert plan.num_experts == 16 and plan.top_k == 2 and plan.family == "qwen3_moe"


def test_plan_ratio_is_the_fraction_actually_pruned(qwen):
    """Plan.ratio is documented as pruned experts / routed experts over all MoE layers.

    ratio 0.3 on 4 x 16 experts: target round(19.2) = 19, closest multiple of 4 is 20,
    so 5 of 16 experts (0.3125) are pruned per layer.
    """
    _, ckpt, layout, scores = qwen
    plan = make_plan(layout, scores, 0.3, ckpt.fingerprint)
    assert plan.total_pruned == 20
    assert plan.ratio == pytest.approx(20 / 64)


# --------------------------------------------------------------------------- determinism

def test_same_input_gives_byte_identical_plan_json(qwen):
    _, ckpt, layout, scores = qwen
    a = make_plan(layout, scores, 0.5, ckpt.fingerprint).to_json()
    b = make_plan(layout, {k: list(v) for k, v in scores.items()}, 0.5, ckpt.fingerprint).to_json()
    # Same scores given with layers in a different order.
    shuffled = {layer: scores[layer] for layer in reversed(sorted(scores))}
    c = make_plan(layout, shuffled, 0.5, ckpt.fingerprint).to_json()
    assert a == b == c
    data = json.loads(a)
    assert list(data["layers"]) == ["0", "1", "2", "3"]
    assert data["checkpoint"] == ckpt.fingerprint


def test_score_cli_twice_writes_identical_files(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([*CLI, "score", str(model), "--ratio", "0.5", "--output", str(o),
                               "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["plan.json", "pruned_experts.json", "scores.csv", "vllm_profile.json"]
    assert sorted(p.name for p in outs[1].iterdir()) == names
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    want = reference_pruned(reference_scores(model), k=8)
    assert json.loads((outs[0] / "pruned_experts.json").read_text()) == {
        str(k): v for k, v in want.items()}
    # The vLLM #37824/#42613 profile: the same decision as [layer, expert] pairs.
    profile = json.loads((outs[0] / "vllm_profile.json").read_text())
    assert profile["version"] == 1 and "routing_mode" not in profile
    assert profile["pruned_experts"] == [[k, e] for k, v in sorted(want.items()) for e in v]


# --------------------------------------------------------------------------- plan_hash

def test_plan_hash_tracks_the_pruned_set(qwen):
    _, ckpt, layout, scores = qwen
    base = make_plan(layout, scores, 0.5, ckpt.fingerprint)
    assert re.fullmatch(r"[0-9a-f]{16}", base.plan_hash)
    # Same decision, different scores: same hash.
    nudged = {layer: [s + 1e-3 for s in v] for layer, v in scores.items()}
    assert make_plan(layout, nudged, 0.5, ckpt.fingerprint).plan_hash == base.plan_hash
    # Another pruned set: another hash.
    assert make_plan(layout, scores, 0.25, ckpt.fingerprint).plan_hash != base.plan_hash
    swapped = {layer: list(v) for layer, v in scores.items()}
    kept0, pruned0 = base.layer(0).kept[-1], base.layer(0).pruned[0]
    swapped[0][kept0], swapped[0][pruned0] = 2.0, 0.0
    other = make_plan(layout, swapped, 0.5, ckpt.fingerprint)
    assert other.layer(0).pruned != base.layer(0).pruned
    assert other.plan_hash != base.plan_hash
    # Another checkpoint: another hash.
    assert make_plan(layout, scores, 0.5, "0" * 64).plan_hash != base.plan_hash


# --------------------------------------------------------------------------- read_plan

def test_read_plan_round_trips_our_plan_json(qwen, tmp_path):
    _, ckpt, layout, scores = qwen
    plan = make_plan(layout, scores, 0.5, ckpt.fingerprint)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    back = read_plan(path, layout, ckpt.fingerprint)
    assert back.to_json() == plan.to_json()
    assert back.plan_hash == plan.plan_hash
    # A directory holding plan.json reads the same.
    assert read_plan(tmp_path, layout, ckpt.fingerprint).to_json() == plan.to_json()


def test_read_plan_reads_the_authors_pruned_experts_json(qwen, tmp_path):
    _, ckpt, layout, scores = qwen
    ids = {0: [15, 3, 7, 0], 1: [1, 2, 3, 4], 2: [9, 8, 10, 11], 3: [0, 5, 6, 14]}
    path = tmp_path / "pruned_experts.json"
    path.write_text(json.dumps({str(k): v for k, v in ids.items()}))
    plan = read_plan(path, layout, ckpt.fingerprint)
    assert plan.layer_ids == [0, 1, 2, 3]
    for layer, pruned in ids.items():
        assert plan.layer(layer).pruned == sorted(pruned)
        assert plan.layer(layer).kept == [e for e in range(16) if e not in pruned]
        assert plan.layer(layer).scores is None
    assert plan.total_pruned == 16 and plan.kept_per_layer == 12
    assert plan.ratio == pytest.approx(0.25)
    assert plan.checkpoint == ckpt.fingerprint
    assert read_plan(tmp_path, layout, ckpt.fingerprint).pruned_experts() == plan.pruned_experts()


def test_read_plan_round_trips_pruned_experts_of_a_scored_plan(qwen, tmp_path):
    _, ckpt, layout, scores = qwen
    plan = make_plan(layout, scores, 0.5, ckpt.fingerprint)
    path = tmp_path / "pruned_experts.json"
    path.write_text(json.dumps(plan.pruned_experts()))
    back = read_plan(path, layout, ckpt.fingerprint)
    assert back.pruned_experts() == plan.pruned_experts()
    assert back.plan_hash == plan.plan_hash
    assert {k: v.kept for k, v in back.layers.items()} == {k: v.kept for k, v in plan.layers.items()}


def _expect_error(path, layout, fingerprint, *needles):
    with pytest.raises(AimerError) as e:
        read_plan(path, layout, fingerprint)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def _write(tmp_path, data, name="pruned_experts.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_plan_for_another_checkpoint_is_rejected(qwen, tmp_path):
    _, ckpt, layout, scores = qwen
    plan = make_plan(layout, scores, 0.5, "9" * 64)
    path = _write(tmp_path, plan.to_json(), "plan.json")
    _expect_error(path, layout, ckpt.fingerprint, "different checkpoint", "999999999999",
                  ckpt.fingerprint[:12])


def test_wrong_layer_count_is_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, {"0": [1], "1": [1], "2": [1]})
    _expect_error(path, layout, ckpt.fingerprint, "different checkpoint", "3 MoE layers",
                  "4 MoE layers")
    path = _write(tmp_path, {str(i): [1] for i in range(5)})
    _expect_error(path, layout, ckpt.fingerprint, "5 MoE layers", "4 MoE layers")


def test_expert_id_out_of_range_is_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, {"0": [1, 16], "1": [1, 2], "2": [1, 2], "3": [1, 2]})
    _expect_error(path, layout, ckpt.fingerprint, "layer 0", "[16]", "0..15")
    path = _write(tmp_path, {"0": [1, 2], "1": [1, 2], "2": [-1, 2], "3": [1, 2]})
    _expect_error(path, layout, ckpt.fingerprint, "layer 2", "[-1]")


def test_duplicate_ids_are_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, {"0": [1, 2], "1": [3, 3], "2": [1, 2], "3": [1, 2]})
    _expect_error(path, layout, ckpt.fingerprint, "layer 1", "[3]", "more than once")


def test_non_uniform_counts_are_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, {"0": [1, 2], "1": [3], "2": [1, 2], "3": [1, 2]})
    _expect_error(path, layout, ckpt.fingerprint, "[1, 2]",
                  "vLLM builds every MoE layer with one expert count")


def test_too_few_kept_is_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    ids = list(range(15))
    path = _write(tmp_path, {str(i): ids for i in range(4)})
    _expect_error(path, layout, ckpt.fingerprint, "keep 1 of 16 experts", "top_k=2")
    # Keeping exactly top_k is fine.
    path = _write(tmp_path, {str(i): ids[:14] for i in range(4)})
    assert read_plan(path, layout, ckpt.fingerprint).kept_per_layer == 2


def test_non_integer_ids_are_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    for bad in ([1, "2"], [True, 2], 3, [1.0, 2]):
        path = _write(tmp_path, {"0": bad, "1": [1, 2], "2": [1, 2], "3": [1, 2]})
        _expect_error(path, layout, ckpt.fingerprint, "layer 0", "integer expert ids")


def test_not_json_is_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, '{"0": [1, 2],')
    _expect_error(path, layout, ckpt.fingerprint, "not valid JSON", str(path))


def test_missing_file_is_rejected(qwen, tmp_path):
    _, ckpt, layout, _ = qwen
    path = tmp_path / "nope.json"
    _expect_error(path, layout, ckpt.fingerprint, "does not exist", str(path))


@pytest.mark.parametrize("data", ["[1, 2]", '"plan"', "42", "null"])
def test_not_an_object_is_rejected(qwen, tmp_path, data):
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, data)
    _expect_error(path, layout, ckpt.fingerprint, "must hold a JSON object")


def test_invalid_plan_json_is_rejected(qwen, tmp_path):
    _, ckpt, layout, scores = qwen
    data = json.loads(make_plan(layout, scores, 0.5, ckpt.fingerprint).to_json())
    data["format"] = "vllm-aimer.plan/v0"
    path = _write(tmp_path, data, "plan.json")
    _expect_error(path, layout, ckpt.fingerprint, "not a valid vllm-aimer.plan/v1 plan")


def test_directory_without_a_plan_is_an_aimer_error(qwen, tmp_path):
    """A directory holding neither plan.json nor pruned_experts.json must give a clear
    AimerError (the CLI prints only AimerErrors as one line), not IsADirectoryError."""
    _, ckpt, layout, _ = qwen
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(empty, layout, ckpt.fingerprint, str(empty))


@pytest.mark.parametrize("keys", [["0", "1", "2", "03"], ["0", "1", "2", "\u00b3"]],
                         ids=["leading_zero", "superscript_digit"])
def test_odd_layer_keys_give_a_plan_or_an_aimer_error(qwen, tmp_path, keys):
    """`str.isdigit()` accepts keys that `pruned[int(key)]` or `int(key)` then trip over."""
    _, ckpt, layout, _ = qwen
    path = _write(tmp_path, {k: [1, 2] for k in keys})
    try:
        plan = read_plan(path, layout, ckpt.fingerprint)
    except AimerError:
        return
    assert plan.layer_ids == [0, 1, 2, 3]


# --------------------------------------------------------------------------- check_ratio

@pytest.mark.parametrize("bad", ["0.5", True, False, -0.1, -1, 1.0, 1, 1.5, math.nan, math.inf,
                                 None, [0.5]])
def test_check_ratio_rejects(bad):
    with pytest.raises(AimerError) as e:
        check_ratio(bad)
    assert "prune_ratio" in str(e.value)


@pytest.mark.parametrize("good", [0, 0.0, 0.25, 0.5, 0.999])
def test_check_ratio_accepts(good):
    out = check_ratio(good)
    assert isinstance(out, float) and out == good


def test_expert_parallel_needs_an_even_split():
    from vllm_aimer.constraints import Deployment, allowed_ratios, check_prune_count

    router, ep4 = Router(16, 2), Deployment(ep_size=4)
    assert allowed_ratios(router, ep4) == [0.0, 0.25, 0.5, 0.75]
    check_prune_count(router, 8, "x", ep4)
    check_prune_count(router, 6, "x", Deployment(ep_size=1))
    # 10 kept over 4 ranks (3, 3, 2, 2) is refused, not warned about.
    with pytest.raises(AimerError, match="do not split evenly over 4 expert-parallel") as info:
        check_prune_count(router, 6, "prune_ratio 0.375", ep4)
    assert "nearest: 0, 0.25, 0.5." in str(info.value)
    with pytest.raises(AimerError, match="3 experts per layer, which do not split") as info:
        check_prune_count(router, 13, "x", ep4)
    assert "0.75" in str(info.value)


def test_blackwell_group_bound_is_strict():
    """FlashInfer's TRT-LLM routing on Blackwell needs top_k < topk_group x experts per
    group, strictly; the base rule (on the CPU and other GPUs) allows equality. 32
    experts in 4 groups, top_k 4, topk_group 2: keeping 8 (2 per group) gives exactly 4."""
    from vllm_aimer.constraints import Deployment, Gpu, allowed_prune_counts, check_prune_count, problems
    from vllm_aimer.errors import AimerError

    router = Router(32, 4, n_group=4, topk_group=2)
    blackwell = Deployment(gpu=Gpu.BLACKWELL)
    assert problems(router, 24) == []
    found = problems(router, 24, blackwell)
    assert len(found) == 1 and "top_k=4 < topk_group x experts per group (2 x 2)" in found[0]
    assert problems(router, 20, blackwell) == []  # keeps 12: 4 < 2 x 3
    assert 24 in allowed_prune_counts(router) and 24 not in allowed_prune_counts(router, blackwell)
    with pytest.raises(AimerError, match="Blackwell"):
        check_prune_count(router, 24, "prune_ratio 0.75", blackwell)
