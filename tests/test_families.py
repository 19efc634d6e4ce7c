"""Issue 7 families, up to the weight iterator: layout, AIMER selection, group-limited
routers, and the exact tensors handed to vLLM, against the test's own references.

The references (tests/helpers/reference.py) load the checkpoint with safetensors,
score and select from the definition and slice a checkpoint themselves; nothing
here uses vllm_aimer to compute an expected value. Fidelity of served models is in
test_fidelity.py.
"""

from __future__ import annotations

import itertools
import re
import json
import random

import numpy as np
import pytest
import torch

from tests.helpers.reference import (
    ROUTER_RE, dequant_mxfp4, load_tensors, reference_pruned, reference_scores, slice_checkpoint)
from vllm_aimer.architectures import ARCHITECTURES
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.constraints import Router, allowed_ratios
from vllm_aimer.constraints import prune_count as _prune_count
from vllm_aimer.plan import make_plan, plan_from_pruned_experts, select_pruned
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.weights import PrunedWeights

RATIO = 0.5


def package(model, ratio=RATIO):
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    scores = score_checkpoint(ckpt, layout, progress=False).scores
    return ckpt, layout, scores, make_plan(layout, scores, ratio, ckpt.fingerprint)


def assert_aimer_plan(model, layout, scores, plan, n_group: int = 1) -> dict[int, list[int]]:
    """Scores equal the test's numpy AIMER and the plan its own selection; returns it."""
    want = reference_scores(model)
    assert sorted(want) == list(layout.layers)
    for layer in layout.layers:
        np.testing.assert_allclose(scores[layer], [want[layer][e] for e in range(16)], rtol=1e-6)
    pruned = reference_pruned(want, RATIO, n_group)
    assert {int(k): v for k, v in plan.pruned_experts().items()} == pruned
    return pruned


def stream(ckpt, layout, plan) -> dict[str, torch.Tensor]:
    items = list(PrunedWeights(ckpt, layout, plan))
    assert len({n for n, _ in items}) == len(items), "a name was yielded twice"
    return dict(items)


def assert_stream_equals_reference(model, tmp_path, got, pruned):
    want = load_tensors(slice_checkpoint(model, tmp_path / "sliced", pruned))
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and tuple(got[name].shape) == tuple(t.shape), name
        assert torch.equal(got[name], t), name


# --------------------------------------------------------------------------- qwen2_moe

def test_qwen2_moe_shared_expert_is_untouched(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen2_moe")
    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == "qwen2_moe" and layout.layers == (0, 1, 2, 3)
    pruned = assert_aimer_plan(model, layout, scores, plan)
    got = stream(ckpt, layout, plan)
    original = load_tensors(model)
    shared = [n for n in original if ".shared_expert" in n]
    assert len(shared) == 4 * 4  # gate/up/down of the shared expert + its sigmoid gate
    for name in shared:
        assert torch.equal(got[name], original[name]), name
    assert_stream_equals_reference(model, tmp_path, got, pruned)


# --------------------------------------------------------------------------- deepseek, glm4_moe

GROUPED = ["deepseek_v2", "deepseek_v3", "glm4_moe"]
ENTRY = {"deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "glm4_moe": "glm4_moe"}


@pytest.mark.parametrize("family", GROUPED)
def test_grouped_plan_is_group_balanced_aimer(tiny_checkpoint, family):
    model = tiny_checkpoint(family)
    config = json.loads((model / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["first_k_dense_replace"]) == (4, 2, 1)
    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == ENTRY[family]
    assert layout.layers == (1, 2, 3)  # layer 0 is dense
    assert (layout.n_group, layout.topk_group) == (4, 2)
    grouped = assert_aimer_plan(model, layout, scores, plan, n_group=4)
    for ids in grouped.values():
        assert [sum(1 for e in ids if e // 4 == g) for g in range(4)] == [2, 2, 2, 2]
    # Sharp: the group-blind AIMER selection differs on this checkpoint.
    assert reference_pruned(reference_scores(model), RATIO) != grouped


@pytest.mark.parametrize("family", GROUPED)
def test_grouped_stream_equals_reference_slice(tiny_checkpoint, family, tmp_path):
    model = tiny_checkpoint(family)
    ckpt, layout, _, plan = package(model)
    pruned = {int(k): v for k, v in plan.pruned_experts().items()}
    got = stream(ckpt, layout, plan)
    assert_stream_equals_reference(model, tmp_path, got, pruned)
    original = load_tensors(model)
    routers = sorted(n for n in got if ROUTER_RE.search(n))
    bias = [n for n in routers if n.endswith("e_score_correction_bias")]
    assert len(bias) == (0 if family == "deepseek_v2" else 3)
    assert len(routers) == 3 + len(bias) and all(got[n].shape[0] == 8 for n in routers)
    # Dense layer 0's MLP and the shared experts reach vLLM unchanged.
    untouched = [n for n in original if ".shared_experts." in n or "layers.0.mlp." in n]
    assert len(untouched) == 3 * 3 + 3
    for name in untouched:
        assert torch.equal(got[name], original[name]), name


def test_select_pruned_matches_brute_force():
    rng = random.Random(3)
    for _ in range(200):
        n_group = rng.choice([1, 2, 4, 8])
        experts = n_group * rng.randint(1, 6)
        k = n_group * rng.randint(0, experts // n_group)
        scores = [round(rng.random(), 1) for _ in range(experts)]  # ties on purpose
        size = experts // n_group
        want = []
        for g in range(n_group):
            ids = list(range(g * size, (g + 1) * size))
            # The k/n_group highest, ties to the lower id: lexicographic minimum.
            best = min(itertools.combinations(ids, k // n_group),
                       key=lambda c: (sorted((-scores[e] for e in c)), sorted(c)))
            want += best
        assert select_pruned(scores, k, n_group) == sorted(want)


def test_group_ratios_are_the_feasible_counts():
    # 16 experts in 4 groups, tokens routed within 2 groups, top_k 2: any multiple of 4
    # up to 12 works (one kept per group x 2 groups = 2 >= top_k).
    assert allowed_ratios(Router(16, 2, 4, 2)) == [0, 0.25, 0.5, 0.75]
    # top_k 6: 3 kept per group x 2 groups is the least.
    assert allowed_ratios(Router(16, 6, 4, 2)) == [0, 0.25]
    # DeepSeek-V3: 256 experts, 8 groups, topk_group 4, top_k 8.
    ok = allowed_ratios(Router(256, 8, 8, 4))
    assert ok[0] == 0 and ok[-1] == 240 / 256 and len(ok) == 31


def test_ratio_that_does_not_split_over_groups_fails_fast():
    with pytest.raises(AimerError) as e:
        _prune_count(3, Router(16, 2, 4, 2), 0.3)
    msg = str(e.value)
    assert "5 of 16 experts per layer" in msg and "n_group=4" in msg
    assert "ratios that work: 0, 0.25, 0.5, 0.75" in msg
    assert _prune_count(3, Router(16, 2, 4, 2), 0.25) == 4


def test_ratio_leaving_too_few_routable_experts_fails_fast():
    with pytest.raises(AimerError) as e:
        _prune_count(3, Router(16, 6, 4, 2), 0.5)
    msg = str(e.value)
    assert "keep 2 experts in each of 4 groups" in msg and "topk_group=2" in msg
    assert "top_k=6" in msg and "ratios that work: 0, 0.25" in msg


def test_loader_path_rejects_unbalanced_ratio_and_plan(tiny_checkpoint, tmp_path):
    ckpt = open_checkpoint(tiny_checkpoint("deepseek_v3"))
    layout = expert_layout(ckpt)
    with pytest.raises(AimerError, match="does not split evenly"):
        make_plan(layout, {l: [0.5] * 16 for l in layout.layers}, 0.3, ckpt.fingerprint)
    # A plan file pruning 2 experts from group 0 and none from group 3 is refused.
    bad = {str(l): [0, 1, 4, 5, 8, 9, 10, 11] for l in layout.layers}
    with pytest.raises(AimerError, match=r"prunes \[2, 2, 4, 0\] experts"):
        plan_from_pruned_experts(layout, bad, ckpt.fingerprint, "bad.json")
    good = {str(l): [0, 1, 4, 5, 8, 9, 12, 13] for l in layout.layers}
    assert plan_from_pruned_experts(layout, good, ckpt.fingerprint, "good.json").kept_per_layer == 8


def test_plain_routers_have_no_groups():
    arch = next(a for a in ARCHITECTURES if a.family == "qwen3_moe")
    layout = ExpertLayout(arch=arch, num_experts=16, top_k=2, layers=(0,), scored={},
                          expert_bytes={})
    assert (layout.n_group, layout.topk_group) == (1, 1)
    assert select_pruned([0.1 * i for i in range(16)], 5) == [11, 12, 13, 14, 15]


# --------------------------------------------------------------------------- ernie4_5_moe

def test_ernie_plan_and_stream(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("ernie4_5_moe")
    config = json.loads((model / "config.json").read_text())
    assert (config["moe_num_experts"], config["moe_k"], config["moe_layer_start_index"]) == (16, 2, 1)
    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == "ernie4_5_moe" and layout.layers == (1, 2, 3)
    pruned = assert_aimer_plan(model, layout, scores, plan)
    got = stream(ckpt, layout, plan)
    assert_stream_equals_reference(model, tmp_path, got, pruned)
    original = load_tensors(model)
    for layer in layout.layers:
        # The score-correction bias is [1, E]: sliced on dim 1, in its checkpoint dtype.
        name = f"model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"
        kept = [e for e in range(16) if e not in pruned[layer]]
        assert tuple(original[name].shape) == (1, 16)
        assert torch.equal(got[name], original[name][:, kept])
        assert tuple(got[f"model.layers.{layer}.mlp.gate.weight"].shape) == (8, 64)
    untouched = [n for n in original if ".shared_experts." in n or "layers.0.mlp." in n]
    assert len(untouched) == 3 * 3 + 3
    for name in untouched:
        assert torch.equal(got[name], original[name]), name


# --------------------------------------------------------------------------- llama4, gpt_oss

# family, build kwargs, MoE layers, router tensors per layer, expert-indexed biases per layer
FUSED_FAMILIES = [
    ("llama4", {}, (1, 3), ("router.weight",), ()),
    ("gpt_oss", {}, (0, 1, 2, 3), ("router.weight", "router.bias"),
     ("experts.gate_up_proj_bias", "experts.down_proj_bias")),
    ("gpt_oss", {"mxfp4": True}, (0, 1, 2, 3), ("router.weight", "router.bias"),
     ("experts.gate_up_proj_bias", "experts.down_proj_bias", "experts.gate_up_proj_scales",
      "experts.down_proj_scales")),
]


@pytest.mark.parametrize("family, kwargs, layers, routers, biases", FUSED_FAMILIES,
                         ids=["llama4", "gpt_oss", "gpt_oss-mxfp4"])
def test_fused_family_plan_and_stream(tiny_checkpoint, tmp_path, family, kwargs, layers,
                                      routers, biases):
    model = tiny_checkpoint(family, **kwargs)
    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == family and layout.layers == layers
    pruned = assert_aimer_plan(model, layout, scores, plan)
    weights = PrunedWeights(ckpt, layout, plan)
    got = dict(weights)
    assert_stream_equals_reference(model, tmp_path, got, pruned)
    original = load_tensors(model)
    block = "feed_forward" if family == "llama4" else "mlp"
    for layer in layers:
        kept = [e for e in range(16) if e not in pruned[layer]]
        for tail in routers + biases:
            name = f"model.layers.{layer}.{block}.{tail}"
            assert torch.equal(got[name], original[name][kept]), name
        fused = [n for n in got if n.startswith(f"model.layers.{layer}.{block}.experts.")]
        assert len(fused) == 2 + len(biases) and all(got[n].shape[0] == 8 for n in fused)
    # Everything that is not routed-expert-indexed reaches vLLM unchanged (llama4: the
    # shared experts and the dense layers' MLPs).
    untouched = [n for n in original if ".experts." not in n and not ROUTER_RE.search(n)]
    for name in untouched:
        assert torch.equal(got[name], original[name]), name
    if family == "llama4":
        assert sum(".shared_expert." in n for n in untouched) == 2 * 3
        assert sum(re.search(r"layers\.[02]\.feed_forward\.", n) is not None
                   for n in untouched) == 2 * 3
    # Pruned rows of fused tensors are skipped, not read: bytes split 8/8.
    assert weights.stats.expert_bytes_skipped == weights.stats.expert_bytes_loaded > 0


def test_llama4_multimodal_layout_prunes_the_text_model(tiny_checkpoint, tmp_path):
    """Llama 4 Scout/Maverick releases nest the text model: `language_model.` tensor
    prefix and config.json's `text_config` (model_type llama4). The stream is the
    text-only checkpoint's, under the prefix, and vision tensors pass through."""
    from safetensors.torch import save_file

    text = tiny_checkpoint("llama4")
    mm = tmp_path / "mm"
    mm.mkdir()
    text_config = json.loads((text / "config.json").read_text())
    config = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
              "text_config": text_config, "vision_config": {"model_type": "llama4_vision_model"}}
    (mm / "config.json").write_text(json.dumps(config))
    tensors = {f"language_model.{n}": t for n, t in load_tensors(text).items()}
    tensors["vision_model.model.layers.0.mlp.fc1.weight"] = torch.ones(4, 4)
    tensors["multi_modal_projector.linear_1.weight"] = torch.ones(4, 4)
    save_file(tensors, mm / "model.safetensors", metadata={"format": "pt"})
    ckpt_t, layout_t, _, plan_t = package(text)
    ckpt, layout, _, plan = package(mm)
    assert layout.layers == (1, 3) and (layout.num_experts, layout.top_k) == (16, 1)
    assert plan.pruned_experts() == plan_t.pruned_experts()
    want = stream(ckpt_t, layout_t, plan_t)
    got = stream(ckpt, layout, plan)
    assert sorted(got) == sorted([f"language_model.{n}" for n in want] + [
        "vision_model.model.layers.0.mlp.fc1.weight", "multi_modal_projector.linear_1.weight"])
    for name, t in want.items():
        assert torch.equal(got[f"language_model.{name}"], t), name


def test_mxfp4_scores_are_dequantized_aimer(tiny_checkpoint):
    model = tiny_checkpoint("gpt_oss", mxfp4=True)
    config = json.loads((model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    want = reference_scores(model)  # dequantized in numpy
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    for chunk in (1 << 20, 100):  # whole experts; a few packed rows per chunk
        got = score_checkpoint(ckpt, layout, chunk_elements=chunk, progress=False).scores
        for layer in want:
            np.testing.assert_allclose(got[layer], [want[layer][e] for e in range(16)], rtol=1e-9)
    # Sharp: the packed bytes read as plain numbers, or the codes without their group
    # exponents, score differently.
    tensors = load_tensors(model)
    for layer in want:
        codes = tensors[f"model.layers.{layer}.mlp.experts.down_proj_blocks"]
        flat = dequant_mxfp4(codes, torch.full(codes.shape[:-1], 127, dtype=torch.uint8))
        unscaled = [float(np.mean(np.abs(flat[e])) / np.sqrt(np.mean(flat[e] ** 2)))
                    for e in range(16)]
        assert max(abs(u - want[layer][e]) for e, u in enumerate(unscaled)) > 1e-3
    # And it is the weights the bfloat16 release would be scored on, up to FP4 rounding.
    dense = reference_scores(tiny_checkpoint("gpt_oss"))
    assert all(abs(dense[l][e] - want[l][e]) < 0.05 for l in want for e in range(16))


@pytest.mark.parametrize("drop, match", [
    ("model.layers.2.mlp.experts.down_proj_scales",
     r"experts\.down_proj: _bias F32 .*_blocks U8 .*must come with `_scales`"),
    ("model.layers.1.mlp.experts.gate_up_proj_blocks",
     r"experts\.gate_up_proj: _bias F32 .*_scales U8 .*cannot decode"),
])
def test_mxfp4_incomplete_checkpoint_is_refused(tiny_checkpoint, tmp_path, drop, match):
    import shutil

    from safetensors.torch import save_file

    model = shutil.copytree(tiny_checkpoint("gpt_oss", mxfp4=True), tmp_path / "m")
    tensors = load_tensors(model)
    del tensors[drop]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AimerError, match=match):
        expert_layout(open_checkpoint(model))


# --------------------------------------------------------------------------- FP8 block-quantized

FP8_WEIGHT_RE = re.compile(
    r"layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.weight$")


FP8_FUSED_RE = re.compile(r"layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")


def numpy_fp8_scores(model, block) -> dict[int, list[float]]:
    """Dequantize every expert weight in numpy (value x its block's scale), then AIMER;
    per-expert or fused ([E, ...] weights with [E, row blocks, column blocks] scales)."""
    tensors = load_tensors(model)
    br, bc = block

    def dequant(w: np.ndarray, s: np.ndarray) -> np.ndarray:
        assert s.shape == (-(-w.shape[0] // br), -(-w.shape[1] // bc))
        return (w * np.kron(s, np.ones((br, bc)))[:w.shape[0], :w.shape[1]]).ravel()

    parts: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = FP8_WEIGHT_RE.search(name)
        f = FP8_FUSED_RE.search(name)
        if not (m or f):
            continue
        assert t.dtype == torch.float8_e4m3fn, name
        w = t.to(torch.float64).numpy()
        s = tensors[name + "_scale_inv"].to(torch.float64).numpy()
        if m:
            parts.setdefault((int(m["layer"]), int(m["expert"])), {})[m["proj"]] = dequant(w, s)
            continue
        for e in range(w.shape[0]):
            parts.setdefault((int(f["layer"]), e), {})[f["proj"]] = dequant(w[e], s[e])
    out: dict[int, list[float]] = {}
    for (layer, expert) in sorted(parts):
        p = parts[(layer, expert)]
        w = np.concatenate([p[k] for k in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
                            if k in p])
        out.setdefault(layer, []).append(float(np.mean(np.abs(w)) / np.sqrt(np.mean(w * w))))
    return out


@pytest.mark.parametrize("family, block, fused", [
    ("qwen3_moe", (128, 128), False), ("qwen3_moe", (32, 48), False),
    ("deepseek_v3", (128, 128), False), ("qwen3_moe", (32, 48), True)],
    ids=["qwen3_moe-128", "qwen3_moe-32x48", "deepseek_v3-128", "qwen3_moe-fused-32x48"])
def test_fp8_scores_are_dequantized_aimer(tiny_checkpoint, family, block, fused):
    model = tiny_checkpoint(family, fp8_block=block, **({"fused": True} if fused else {}))
    config = json.loads((model / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(block)
    want = numpy_fp8_scores(model, block)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    for chunk in (1 << 20, 1000):  # one chunk per tensor; several block rows per chunk
        got = score_checkpoint(ckpt, layout, chunk_elements=chunk, progress=False).scores
        assert sorted(got) == sorted(want)
        for layer in want:
            np.testing.assert_allclose(got[layer], want[layer], rtol=1e-6)  # test_scoring's REL
    # Sharp: the raw FP8 codes (scales ignored) score differently.
    raw = reference_scores(model)
    assert any(abs(raw[l][e] - want[l][e]) > 1e-4 for l in want for e in range(16))
    plan = make_plan(layout, got, RATIO, ckpt.fingerprint)
    assert {int(k): v for k, v in plan.pruned_experts().items()} == reference_pruned(
        {l: dict(enumerate(s)) for l, s in want.items()}, RATIO, config.get("n_group") or 1)


def test_fp8_stream_skips_and_renumbers_scales(tiny_checkpoint):
    from tests.helpers.reference import sliced_tensors

    model = tiny_checkpoint("qwen3_moe", fp8_block=(32, 48))
    ckpt, layout, _, plan = package(model)
    pruned = {int(k): v for k, v in plan.pruned_experts().items()}
    weights = PrunedWeights(ckpt, layout, plan)
    got = dict(weights)
    want = sliced_tensors(model, pruned)
    assert sorted(got) == sorted(want)

    def raw(t):  # FP8 compared bit for bit
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(raw(got[name]), raw(t)), name
    scales = [n for n in got if n.endswith("weight_scale_inv")]
    assert len(scales) == 4 * 8 * 3  # kept experts only, renumbered 0..7
    assert all(got[n.removesuffix("_scale_inv")].dtype == torch.float8_e4m3fn for n in scales)
    pruned_scales = set()
    for name in ckpt.tensors:
        m = re.search(r"layers\.(\d+)\.mlp\.experts\.(\d+)\..*_scale_inv$", name)
        if m and int(m[2]) in pruned[int(m[1])]:
            pruned_scales.add(name)
    assert len(pruned_scales) == 4 * 8 * 3 and not pruned_scales & weights.stats.tensors_read
    assert len(weights.stats.tensors_read) == len(ckpt.tensors) - 2 * len(pruned_scales)


def test_fused_fp8_stream_slices_weights_and_scales(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe", fp8_block=(32, 48), fused=True)
    ckpt, layout, _, plan = package(model)
    pruned = {int(k): v for k, v in plan.pruned_experts().items()}
    weights = PrunedWeights(ckpt, layout, plan)
    got = {n: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
           for n, t in weights}
    want = load_tensors(slice_checkpoint(model, tmp_path / "sliced", pruned))
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
        assert torch.equal(got[name], raw), name
    scales = [n for n in got if n.endswith("_scale_inv")]
    assert len(scales) == 4 * 2 and all(got[n].shape[0] == 8 for n in scales)
    assert got["model.layers.0.mlp.experts.gate_up_proj_scale_inv"].shape == (8, 4, 2)
    assert weights.stats.expert_bytes_skipped == weights.stats.expert_bytes_loaded > 0


def test_fp8_weight_without_scales_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import save_file

    model = shutil.copytree(tiny_checkpoint("qwen3_moe", fp8_block=(128, 128)), tmp_path / "m")
    tensors = load_tensors(model)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AimerError, match=r"experts\.5\.up_proj: weight F8_E4M3 \[64, 64\] \(quantization: fp8\) .*cannot decode"):
        expert_layout(open_checkpoint(model))


def test_cli_inspect_and_score_know_the_groups(tiny_checkpoint, tmp_path, capsys):
    from vllm_aimer.cli import main

    model = tiny_checkpoint("glm4_moe")
    assert main(["inspect", str(model), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "glm4_moe" and facts["moe_layers"] == [1, 2, 3]
    assert (facts["expert_groups"], facts["topk_group"]) == (4, 2)
    assert facts["max_prune_ratio"] == 0.75  # one kept per group x 2 groups = top_k
    assert main(["score", str(model), "--ratio", "0.3", "--output", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "does not split evenly" in err and "ratios that work: 0, 0.25, 0.5, 0.75" in err
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- issue 12 families

def _renamed(src, dst, config_edit, rename=lambda n: n, extra=None):
    """A copy of a tiny checkpoint with its config edited and its tensors renamed."""
    from safetensors.torch import save_file

    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(config)))
    tensors = {rename(n): t for n, t in load_tensors(src).items()}
    tensors.update(extra or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# Same tensor names as the tiny model they are built from (confirmed in vLLM's model
# files, see the entries in architectures.py); only config.json's model_type differs.
ALIASES = [("kimi_k2", "deepseek_v3", "kimi_k2"), ("deepseek_v32", "deepseek_v3", "deepseek_v32"),
           ("glm_moe_dsa", "deepseek_v3", "glm_moe_dsa"),
           ("glm4_moe_lite", "glm4_moe", "glm4_moe_lite")]


@pytest.mark.parametrize("model_type, base, family", ALIASES, ids=[a[0] for a in ALIASES])
def test_alias_families_plan_and_stream(tiny_checkpoint, tmp_path, model_type, base, family):
    model = _renamed(tiny_checkpoint(base), tmp_path / model_type,
                     lambda c: c | {"model_type": model_type})
    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == family and layout.layers == (1, 2, 3)
    assert (layout.n_group, layout.topk_group) == (4, 2)
    pruned = assert_aimer_plan(model, layout, scores, plan, n_group=4)
    got = stream(ckpt, layout, plan)
    assert_stream_equals_reference(model, tmp_path, got, pruned)
    assert sum(n.endswith("gate.e_score_correction_bias") for n in got) == 3


def test_kimi_k25_prunes_its_text_model(tiny_checkpoint, tmp_path):
    """Kimi-K2.5/K2.6: model_type kimi_k25, the DeepSeek-V3-style text model in
    text_config (model_type kimi_k2) under `language_model.`; the vision tower and
    projector pass through. The plan and stream are the text model's, prefixed."""
    text = _renamed(tiny_checkpoint("deepseek_v3"), tmp_path / "text",
                    lambda c: c | {"model_type": "kimi_k2"})
    vision = {"vision_tower.encoder.blocks.0.wqkv.weight": torch.ones(4, 4),
              "mm_projector.proj.0.weight": torch.ones(4, 4)}
    mm = _renamed(text, tmp_path / "mm",
                  lambda c: {"model_type": "kimi_k25",
                             "architectures": ["KimiK25ForConditionalGeneration"],
                             "text_config": c, "vision_config": {"model_type": "moonvit"}},
                  lambda n: f"language_model.{n}", vision)
    ckpt_t, layout_t, _, plan_t = package(text)
    ckpt, layout, _, plan = package(mm)
    assert layout.arch.family == "kimi_k2" and layout.layers == (1, 2, 3)
    assert plan.pruned_experts() == plan_t.pruned_experts()
    want = stream(ckpt_t, layout_t, plan_t)
    got = stream(ckpt, layout, plan)
    assert sorted(got) == sorted([f"language_model.{n}" for n in want] + list(vision))
    for name, t in want.items():
        assert torch.equal(got[f"language_model.{name}"], t), name


def test_qwen3_vl_moe_prunes_its_fused_transposed_text_experts(tiny_checkpoint, tmp_path):
    """Qwen3-VL-MoE: `model.language_model.layers.N.mlp.experts.gate_up_proj` [E, H, 2I]
    and `down_proj` [E, I, H] (transposed, as vLLM's is_fused_checkpoint_transposed
    says), config in text_config (qwen3_vl_moe_text); scores are the same entries as
    the per-expert text model's, and the stream slices dim 0."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    src = tiny_checkpoint("qwen3_moe", fused=True)
    visual = {"model.visual.blocks.0.attn.qkv.weight": torch.ones(4, 4)}

    def rename(n):
        return n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n

    model = _renamed(src, tmp_path / "vl",
                     lambda c: {"model_type": "qwen3_vl_moe",
                                "architectures": ["Qwen3VLMoeForConditionalGeneration"],
                                "text_config": c | {"model_type": "qwen3_vl_moe_text"},
                                "vision_config": {"model_type": "qwen3_vl_moe"}},
                     rename, visual)
    # Transpose the fused experts as the releases store them.
    from safetensors.torch import save_file
    tensors = load_tensors(model)
    for n in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[n] = tensors[n].transpose(1, 2).contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (16, 64, 128)

    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == "qwen3_vl_moe" and layout.layers == (0, 1, 2, 3)
    want = reference_scores(tiny_checkpoint("qwen3_moe"))  # per-expert, same weights
    for layer in layout.layers:
        np.testing.assert_allclose(scores[layer], [want[layer][e] for e in range(16)], rtol=1e-6)
    pruned = {int(k): v for k, v in plan.pruned_experts().items()}
    assert pruned == reference_pruned(want, RATIO)
    got = stream(ckpt, layout, plan)
    assert sorted(got) == sorted(tensors)
    mapping = RoutedExperts.build_expert_params_mapping(
        "gate_proj", "down_proj", "up_proj", num_experts=8, include_fused=True)
    for name, t in tensors.items():
        layer_m = re.search(r"layers\.(\d+)\.mlp\.(experts\.\w+|gate\.weight)$", name)
        if layer_m:
            kept = [e for e in range(16) if e not in pruned[int(layer_m[1])]]
            assert torch.equal(got[name], t[kept]), name
            if "experts." in name:
                params = {p for p, w, _, _ in mapping if w in name}
                assert len(params) == 1, (name, params)
        else:
            assert torch.equal(got[name], t), name


# --------------------------------------------------------------------------- MTP families

def _mtp_variant(tiny_checkpoint, tmp_path, base: str, config_edit, rename, **build):
    """(model, reference) for a family with MTP layers: `model` is the tiny `base`
    checkpoint with one MTP layer, renamed into the family's layout; `reference` the
    same tensors in DeepSeek numbering (MTP layer = layers.4), which the test's own
    reference code scores, plans (k from trunk layers 0-3) and slices."""
    src = tiny_checkpoint(base, mtp_layers=1, **build)
    return _renamed(src, tmp_path / "model", config_edit, rename), src


def _assert_mtp_family(model, reference, tmp_path, family, back, n_group=1, trunk=(0, 1, 2, 3)):
    ckpt, layout, scores, plan = package(model)
    assert layout.arch.family == family
    assert layout.layers == trunk and layout.mtp_layers == (4,)
    want = reference_scores(reference)
    pruned = reference_pruned(want, RATIO, n_group, mtp_from=4)
    for layer in layout.all_layers:
        np.testing.assert_allclose(scores[layer], [want[layer][e] for e in range(16)], rtol=1e-6)
        assert plan.layer(layer).pruned == pruned[layer], layer
    assert plan.layer_ids == list(trunk) and plan.mtp_layer_ids == [4]
    got = {back(n): t for n, t in stream(ckpt, layout, plan).items()}
    assert_stream_equals_reference(reference, tmp_path, got, pruned)
    return got


def test_qwen3_next_prunes_its_mtp_layer_under_the_mtp_prefix(tiny_checkpoint, tmp_path):
    """Qwen3-Next: per-expert experts and a shared expert as Qwen2-MoE, plus the MTP
    layer at `mtp.layers.0.` (qwen3_next_mtp.py), keyed after the trunk (layer 4), not
    mistaken for trunk layer 0."""
    def rename(n):
        return n.replace("model.layers.4.", "mtp.layers.0.")

    model, ref = _mtp_variant(tiny_checkpoint, tmp_path, "qwen2_moe",
                              lambda c: c | {"model_type": "qwen3_next"}, rename)
    got = _assert_mtp_family(model, ref, tmp_path, "qwen3_next",
                             lambda n: n.replace("mtp.layers.0.", "model.layers.4."))
    assert sum(".shared_expert." in n for n in got) == 5 * 3  # untouched, trunk + MTP


def test_qwen3_5_moe_prunes_fused_text_experts_and_its_mtp_layer(tiny_checkpoint, tmp_path):
    """Qwen3.5/3.6 MoE: fused experts under `model.language_model.`, config in
    text_config, a shared expert, and MTP layers at `mtp.layers.{i}` (qwen3_5_mtp.py)."""
    def rename(n):
        if n.startswith("model.layers.4."):
            return n.replace("model.layers.4.", "mtp.layers.0.")
        return n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n

    def back(n):
        if n.startswith("mtp.layers.0."):
            return n.replace("mtp.layers.0.", "model.layers.4.")
        return n.replace("model.language_model.", "model.", 1)

    model, ref = _mtp_variant(
        tiny_checkpoint, tmp_path, "qwen2_moe",
        lambda c: {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                   "text_config": c | {"model_type": "qwen3_5_moe_text"},
                   "vision_config": {"model_type": "qwen3_5_moe"}},
        rename, fused=True)
    got = _assert_mtp_family(model, ref, tmp_path, "qwen3_5_moe", back)
    assert got["model.layers.4.mlp.experts.gate_up_proj"].shape[0] == 8


def test_minimax_m2_slices_its_score_correction_bias_and_mtp_modules(tiny_checkpoint, tmp_path):
    """MiniMax-M2: Mixtral names, a router score-correction bias directly under
    `block_sparse_moe.` (minimax_m2.py), MTP modules after the trunk (`num_mtp_modules`)."""
    from safetensors.torch import save_file

    src = tiny_checkpoint("mixtral", mtp_layers=1)
    ref = tmp_path / "reference"
    ref.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.pop("num_nextn_predict_layers")
    (ref / "config.json").write_text(json.dumps(config | {"model_type": "minimax_m2",
                                                          "num_mtp_modules": 1}))
    tensors = load_tensors(src)
    g = torch.Generator().manual_seed(9)
    for layer in range(5):
        tensors[f"model.layers.{layer}.block_sparse_moe.e_score_correction_bias"] = \
            torch.randn(16, generator=g)
    save_file(tensors, ref / "model.safetensors", metadata={"format": "pt"})
    got = _assert_mtp_family(ref, ref, tmp_path, "minimax_m2", lambda n: n)
    assert got["model.layers.4.block_sparse_moe.e_score_correction_bias"].shape == (8,)
