"""Quantized experts: every format's scores equal dequantize-then-AIMER (numpy, from
the format's recipe), the weight stream hands vLLM every expert tensor under a name
vLLM's own expert mapping places in the new slot, and what cannot be decoded is
refused with a message, before anything is written.

Checkpoints are built by tests/quant_checkpoints.py with each format's packer (the
`compressed-tensors` package for its formats; GPTQ/AWQ packers written in
vllm_aimer.testing.encoders and checked here against vLLM's `gptq_pack` / `awq_pack`).
vLLM's CPU build cannot run these formats here (its quantized MoE kernels need AMX or
Arm), so none of this goes through an engine.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import quant_reference as qr
from tests.quant_checkpoints import (EXPERT_TENSOR_RE, FORMATS, build, projections,
                                     reference_scores)
from vllm_aimer.checkpoint import TensorInfo, open_checkpoint
from vllm_aimer.cli import main
from vllm_aimer.dtypes import dtype_bits
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import expert_layout
from vllm_aimer.plan import make_plan, plan_from_pruned_experts
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.testing.encoders import awq, gptq, nvfp4
from vllm_aimer.weights import PrunedWeights

REL = 1e-6
RATIO = 0.5


@pytest.fixture(scope="session")
def quant_checkpoint(tmp_path_factory):
    """`quant_checkpoint(format name, family="qwen3_moe") -> Path`, built once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, family: str = "qwen3_moe") -> Path:
        if (name, family) not in cache:
            root = tmp_path_factory.mktemp(f"q-{name}-{family}")
            cache[(name, family)] = build(root / "model", FORMATS[name], family)
        return cache[(name, family)]

    return get


def reference_plan(scores: dict[int, list[float]], k: int) -> dict[int, list[int]]:
    return {l: sorted(sorted(range(len(s)), key=lambda e: (-s[e], e))[:k])
            for l, s in scores.items()}


def package_scores(model: Path, **kwargs) -> dict[int, list[float]]:
    ckpt = open_checkpoint(model)
    return score_checkpoint(ckpt, expert_layout(ckpt), progress=False, **kwargs).scores


# --------------------------------------------------------------------------- scores

@pytest.mark.parametrize("name", sorted(FORMATS))
def test_scores_equal_dequantized_aimer(quant_checkpoint, name, record_property):
    fmt = FORMATS[name]
    model = quant_checkpoint(name)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    assert layout.encodings == (fmt.encoding,) and layout.scorable
    want = reference_scores(model, fmt)
    worst = 0.0
    for chunk in (1 << 20, 4096):  # one chunk per matrix; several per matrix
        got = score_checkpoint(ckpt, layout, chunk_elements=chunk, progress=False).scores
        assert sorted(got) == sorted(want)
        for layer in want:
            np.testing.assert_allclose(got[layer], want[layer], rtol=REL, atol=0)
            worst = max(worst, float(np.max(np.abs(np.subtract(got[layer], want[layer]))
                                            / np.asarray(want[layer]))))
    record_property("max_rel_error", worst)
    # The plan is unambiguous on these weights, and it is the reference's.
    assert all(np.diff(np.sort(s)).min() > 1e-3 for s in want.values())
    plan = make_plan(layout, got, RATIO, ckpt.fingerprint)
    assert {int(k): v for k, v in plan.pruned_experts().items()} == reference_plan(want, 4)


def test_block_fp8_reads_whole_blocks_in_numpy_on_threads(quant_checkpoint):
    """Whole 128x128 blocks of E4M3 codes with float32 scales take the memory-mapped
    numpy path (threaded); its scores equal the torch decoder's on the same checkpoint
    and the numpy dequantize-then-AIMER reference, for any thread count."""
    model = quant_checkpoint("fp8-block-128")
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    scorers = [st.scorer for layer in layout.layers for st in layout.scored[layer]]
    assert scorers and all(s.threaded for s in scorers)
    mapped = [score_checkpoint(ckpt, layout, progress=False, threads=n).scores for n in (1, 4)]
    assert mapped[0] == mapped[1]
    for s in scorers:
        s.threaded = False  # the torch decoder, as for partial blocks or E5M2
    decoded = score_checkpoint(ckpt, layout, progress=False).scores
    want = reference_scores(model, FORMATS["fp8-block-128"])
    for layer in want:
        np.testing.assert_allclose(mapped[0][layer], decoded[layer], rtol=REL, atol=0)
        np.testing.assert_allclose(mapped[0][layer], want[layer], rtol=REL, atol=0)


@pytest.mark.parametrize("name", ["gptq-4b-g32-asym-v1", "pq-4b-g128-asym", "nvfp4-modelopt",
                                  "int8-channel-asym", "fp8-ct-block-48x96"])
def test_scales_and_zero_points_matter(quant_checkpoint, name):
    """Sharp: dropping the scales (or zero points) changes the scores the test expects, so
    a decoder that ignored them would fail the test above."""
    fmt = FORMATS[name]
    model = quant_checkpoint(name)
    want = reference_scores(model, fmt)

    def crippled(t: dict[str, torch.Tensor]) -> np.ndarray:
        t = dict(t)
        for key in ("scales", "weight_scale", "weight_scale_inv"):
            if key in t:
                t[key] = torch.ones_like(t[key].to(torch.float32)).to(t[key].dtype)
        return fmt.dequant(t)

    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    for (layer, expert, _), tensors in sorted(projections(model).items()):
        parts.setdefault((layer, expert), []).append(crippled(tensors))
    unscaled = {l: [qr.aimer(parts[(l, e)]) for e in range(8)] for l in want}
    assert max(abs(unscaled[l][e] - want[l][e]) for l in want for e in range(8)) > 1e-3


def test_mixtral_names_score_the_same(quant_checkpoint):
    """`block_sparse_moe.experts.{j}.w1/w3/w2` (TheBloke's Mixtral GPTQ/AWQ layout)."""
    for name in ("gptq-4b-g128-sym-v1", "awq-g128"):
        model = quant_checkpoint(name, "mixtral")
        np.testing.assert_allclose(
            sum(package_scores(model).values(), []),
            sum(reference_scores(model, FORMATS[name]).values(), []), rtol=REL)


# --------------------------------------------------------------------------- the recipes

CT_FORMATS = {"fp8-ct-channel": "float-quantized", "fp8-ct-block-48x96": "float-quantized",
              "fp8-ct-group-64": "float-quantized", "int8-channel-asym": "int-quantized",
              "pq-4b-g64-asym": "pack-quantized", "pq-4b-g64-act-order": "pack-quantized",
              "pq-8b-g64-sym": "pack-quantized", "nvfp4-ct": "nvfp4-pack-quantized",
              "mxfp4-u8": "mxfp4-pack-quantized"}


@pytest.mark.parametrize("name", sorted(CT_FORMATS))
def test_numpy_recipe_equals_the_producers_decompression(name):
    """The tests' numpy dequantization reads compressed-tensors bytes as the package
    itself decompresses them (its compressor's `decompress`)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    fmt = FORMATS[name]
    weights = fmt.config["config_groups"]["group_0"]["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    # (compressed-tensors' own decompression needs whole blocks; scoring does not, see
    # the ragged 48x96 blocks above.)
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(1)) * 0.02
    tensors = fmt.encode(w)
    ours = fmt.dequant(tensors)
    theirs = BaseCompressor.load_from_registry(CT_FORMATS[name]).decompress(
        {k: v.clone() for k, v in tensors.items()}, scheme)["weight"]
    np.testing.assert_allclose(ours, theirs.to(torch.float64).numpy(), rtol=1e-2, atol=1e-6)
    # And the dequantized weight is the original up to quantization error.
    assert np.abs(ours - w.double().numpy()).max() < 0.5 * np.abs(w.numpy()).max()


@pytest.mark.parametrize("bits, group", [(4, 128), (8, 64), (4, 32)])
def test_gptq_packing_and_recipe_agree_with_vllm(bits, group):
    """vLLM's test helpers quantize (uint4b8 / uint8b128: symmetric, bias 2^(b-1)) and
    pack (`gptq_pack`): our packer writes the same words and our numpy recipe gives
    vLLM's dequantized reference."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        gptq_pack, gptq_quantize_weights)
    from vllm.scalar_type import scalar_types

    k, n = 256, 64
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(bits)) * 0.02
    qtype = scalar_types.uint4b8 if bits == 4 else scalar_types.uint8b128
    w_ref, q, s = gptq_quantize_weights(w, qtype, group)
    packed = gptq_pack(q, bits, k, n)
    assert torch.equal(gptq.pack_gptq(q, bits, dim=0), packed)
    got = qr.gptq({"qweight": packed, "scales": s}, bits, group, symmetric=True, version=1)
    np.testing.assert_allclose(got, w_ref.double().numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("group", [128, 64, 32])
def test_awq_packing_and_recipe_agree_with_vllm(group):
    """vLLM's `quantize_weights(zero_points=True)` + `awq_pack` (AutoAWQ's interleaved
    order): our packer writes the same words; our numpy recipe gives vLLM's reference."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (awq_pack,
                                                                           quantize_weights)
    from vllm.scalar_type import scalar_types

    k, n = 256, 64
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(group)) * 0.02
    w_ref, q, s, zp = quantize_weights(w, scalar_types.uint4, group, zero_points=True)
    qweight, qzeros = awq_pack(q, 4, k, n), awq_pack(zp, 4, k // group, n)
    assert torch.equal(awq.pack_awq(q.to(torch.int64)), qweight)
    assert torch.equal(awq.pack_awq(zp.to(torch.int64)), qzeros)
    got = qr.awq({"qweight": qweight, "qzeros": qzeros, "scales": s}, group)
    np.testing.assert_allclose(got, w_ref.double().numpy(), rtol=1e-6, atol=1e-9)


def test_nvfp4_recipe_agrees_with_vllm():
    """vLLM's own NVFP4 dequantization (`dequantize_to_dtype`, unswizzled scales, the
    ModelOpt scale_2 as the global factor) equals the numpy recipe."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        dequantize_to_dtype)

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    t = nvfp4.encode(w, "modelopt")
    theirs = dequantize_to_dtype(t["weight"], t["weight_scale"], t["weight_scale_2"],
                                 torch.float32, swizzle=False)
    np.testing.assert_allclose(qr.nvfp4(t), theirs.double().numpy(), rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- the stream

def _expert_mapping(family: str, k: int) -> list[tuple[str, str, int, str]]:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    names = ("gate_proj", "down_proj", "up_proj") if family == "qwen3_moe" else ("w1", "w2", "w3")
    return RoutedExperts.build_expert_params_mapping(*names, num_experts=k)


def _slice(model: Path, pruned: dict[int, list[int]], experts: int) -> dict[str, torch.Tensor]:
    """The test's own slice: pruned experts dropped, kept ones renumbered in order."""
    out = {}
    for name, t in load_file(model / "model.safetensors").items():
        m = EXPERT_TENSOR_RE.search(name)
        if m:
            layer, old = int(m["layer"]), int(m["expert"])
            if old in pruned[layer]:
                continue
            new = [e for e in range(experts) if e not in pruned[layer]].index(old)
            name = name.replace(f".experts.{old}.", f".experts.{new}.")
        elif re.search(r"\.gate\.weight$", name):
            layer = int(re.search(r"layers\.(\d+)\.", name)[1])
            t = t[[e for e in range(experts) if e not in pruned[layer]]]
        out[name] = t
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype.itemsize == 1 else t


@pytest.mark.parametrize("name, family", [(n, "qwen3_moe") for n in sorted(FORMATS)] + [
    ("gptq-4b-g128-sym-v1", "mixtral"), ("awq-g128", "mixtral"), ("nvfp4-ct", "mixtral")])
def test_stream_lands_in_vllms_expert_slots(quant_checkpoint, name, family):
    model = quant_checkpoint(name, family)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    # Scattered kept ids, first and last pruned (scores are tested above).
    pruned = {0: [0, 2, 3, 7], 1: [1, 4, 5, 6]}
    plan = plan_from_pruned_experts(layout, {str(k): v for k, v in pruned.items()},
                                    ckpt.fingerprint, "test")
    weights = PrunedWeights(ckpt, layout, plan)
    got = dict(weights)
    want = _slice(model, pruned, 8)
    assert sorted(got) == sorted(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(_raw(got[n]), _raw(t)), n
    # Every expert tensor matches exactly one of vLLM's (param, weight, expert, shard)
    # entries for K = 4 experts, the one of its new id.
    mapping = _expert_mapping(family, 4)
    suffixes = set()
    for n in got:
        m = EXPERT_TENSOR_RE.search(n)
        if not m:
            continue
        hits = [entry for entry in mapping if entry[1] in n]
        assert len(hits) == 1, (n, hits)
        assert hits[0][2] == int(m["expert"]) < 4, (n, hits[0])
        suffixes.add(m["suffix"])
    assert suffixes == {s for t in projections(model).values() for s in t}
    # Pruned experts' tensors (weights, scales, zero points, shapes) were never read.
    read_pruned = {n for n in weights.stats.tensors_read if (m := EXPERT_TENSOR_RE.search(n))
                   and int(m["expert"]) in pruned[int(m["layer"])]}
    assert not read_pruned


def test_gpt_oss_mxfp4_names_land_in_vllms_slots(tiny_checkpoint):
    """Fused gpt-oss MXFP4: vLLM renames by suffix (GptOssForCausalLM.hf_to_vllm_mapper);
    every fused tensor the stream yields has exactly one rule, and K rows."""
    from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

    model = tiny_checkpoint("gpt_oss", mxfp4=True)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    plan = make_plan(layout, score_checkpoint(ckpt, layout, progress=False).scores, RATIO,
                     ckpt.fingerprint)
    rules = GptOssForCausalLM.hf_to_vllm_mapper.orig_to_new_suffix
    fused = {n: t for n, t in PrunedWeights(ckpt, layout, plan) if ".experts." in n}
    assert len(fused) == 4 * 6
    for n, t in fused.items():
        assert sum(n.endswith(s) for s in rules) == 1, n
        assert t.shape[0] == 8


# --------------------------------------------------------------------------- refusals

def _variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _drop(suffix: str):
    def edit(tensors, config):
        for n in [n for n in tensors if n.endswith("." + suffix)]:
            del tensors[n]
    return edit


def _add(name: str, value: torch.Tensor):
    def edit(tensors, config):
        tensors[name] = value
    return edit


def _config(**values):
    def edit(tensors, config):
        config["quantization_config"] = {**config["quantization_config"], **values}
    return edit


REFUSALS = [
    # ModelOpt NVFP4 weights without their global scale: uint8 codes, no decoder.
    ("nvfp4-modelopt", _drop("weight_scale_2"),
     r"experts\.\d+\.\w+_proj: weight U8 \[128, 64\], weight_scale F8_E4M3 \[128, 8\] "
     r"\(quantization: modelopt \(NVFP4\)\) .*cannot decode.* never scores raw codes", True),
    # INT8 codes without their scales.
    ("int8-channel", _drop("weight_scale"), r"_proj: weight I8 \[128, 128\] .*cannot decode",
     True),
    # vLLM-internal fused names under the experts: sliced by nobody, refused.
    ("fp8-ct-channel", _add("model.layers.0.mlp.experts.w13_weight_scale", torch.ones(8, 2)),
     r"experts\.w13_weight_scale sits under the routed experts", False),
    ("nvfp4-modelopt", _add("model.layers.1.mlp.experts.gate_up_proj.weight_scale_2",
                            torch.ones(8)), r"gate_up_proj\.weight_scale_2 sits under", False),
    # GPTQ-like tensors under a method nobody documents.
    ("gptq-4b-g128-sym-v1", _config(quant_method="exl9"),
     r"GPTQ tensors .* under quant_method 'exl9'", True),
    # Asymmetric scheme whose zero points are missing.
    ("pq-4b-g128-asym", _drop("weight_zero_point"),
     r"symmetric=False, but weight_zero_point is absent", True),
    # AWQ GEMV packs differently.
    ("awq-g64", _config(version="gemv"), r"version 'gemv'.*AutoAWQ GEMM", True),
    # A compressed-tensors scheme that says 8-bit float for int codes.
    ("int8-channel", _config(config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                           "strategy": "channel"}}}),
     r"int8 weights under quant_method 'compressed-tensors'", True),
    # Block-FP8 scales of the wrong shape.
    ("fp8-block-128", _config(weight_block_size=[64, 64]), r"expected \[2, 2\] .* in 64x64 blocks",
     True),
]


@pytest.mark.parametrize("name, edit, message, plan_loads", REFUSALS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_what_cannot_be_decoded_is_refused(quant_checkpoint, tmp_path, capsys, name, edit,
                                           message, plan_loads):
    model = _variant(quant_checkpoint(name), tmp_path / "m", edit)
    with pytest.raises(AimerError, match=message):
        expert_layout(open_checkpoint(model))
    out = tmp_path / "plan-out"
    assert main(["score", str(model), "--ratio", "0.5", "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1
    assert not out.exists()
    # With a plan nothing is scored: per-expert tensors are renamed whatever their
    # encoding, so the load goes on; unplaceable fused names stay refused.
    if plan_loads:
        layout = expert_layout(open_checkpoint(model), scoring=False)
        assert not layout.scorable and re.search(message, layout.unscorable)
    else:
        with pytest.raises(AimerError, match=message):
            expert_layout(open_checkpoint(model), scoring=False)


def test_unknown_dtype_is_an_error_not_one_byte():
    assert dtype_bits("F4") == 4 and dtype_bits("F8_E8M0") == 8 and dtype_bits("F6_E3M2") == 6
    with pytest.raises(AimerError, match=r"safetensors dtype 'Q7'.*known: BOOL"):
        dtype_bits("Q7")
    with pytest.raises(AimerError, match=r"tensor x has safetensors dtype 'Q7'"):
        TensorInfo("x", "model.safetensors", "Q7", (4, 4)).nbytes
    assert TensorInfo("x", "model.safetensors", "F4", (4, 4)).nbytes == 8


# --------------------------------------------------------------------------- plan files

def test_a_plan_loads_a_format_that_cannot_be_scored(quant_checkpoint, tmp_path, capsys):
    """AWQ GEMV is not decoded, yet with a plan the stream renames and slices it and
    `vllm-aimer plan` accepts the plan (nothing demands a `.weight` per projection)."""
    model = _variant(quant_checkpoint("awq-g64"), tmp_path / "m", _config(version="gemv"))
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt, scoring=False)
    assert not layout.scorable and layout.layers == (0, 1)
    pruned = {0: [0, 3, 5, 6], 1: [1, 2, 4, 7]}
    plan = plan_from_pruned_experts(layout, {str(k): v for k, v in pruned.items()},
                                    ckpt.fingerprint, "test")
    got = dict(PrunedWeights(ckpt, layout, plan))
    want = _slice(model, pruned, 8)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], t) for n, t in want.items())
    assert {n.rsplit(".", 1)[1] for n in got if ".experts." in n} == {"qweight", "qzeros", "scales"}
    plan_file = tmp_path / "pruned_experts.json"
    plan_file.write_text(json.dumps({str(k): v for k, v in pruned.items()}))
    assert main(["plan", str(model), str(plan_file)]) == 0
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "quantization      awq (4-bit, group 64)" in out
    assert "AIMER scoring     no: prune with a plan file" in out and "version 'gemv'" in out


# --------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("name", ["gptq-4b-g32-asym-v1", "awq-g128", "pq-4b-g32-sym",
                                  "nvfp4-modelopt-hf-quant-file", "fp8-ct-block-48x96",
                                  "mxfp4-e8m0", "int8-channel-asym"])
def test_cli_score_gives_the_dequantized_plan(quant_checkpoint, tmp_path, capsys, name):
    model = quant_checkpoint(name)
    out = tmp_path / "plan"
    assert main(["score", str(model), "--ratio", "0.5", "--output", str(out), "--quiet"]) == 0
    got = json.loads((out / "pruned_experts.json").read_text())
    want = reference_plan(reference_scores(model, FORMATS[name]), 4)
    assert {int(k): v for k, v in got.items()} == want
    capsys.readouterr()
    assert main(["inspect", str(model), "--json"]) == 0
    quant = json.loads(capsys.readouterr().out)["quantization"]
    assert quant["scorable"] is True and quant["expert_encodings"] == [FORMATS[name].encoding]
    assert quant["method"] == ("modelopt" if "modelopt" in name else
                               FORMATS[name].config["quant_method"])


def test_compressed_tensors_scheme_lookup_follows_vllms_precedence():
    """An exact module name beats a `re:` pattern beats a layer class, among equals the
    first group; `ignore` drops a module by name or pattern, never by class."""
    from vllm_aimer.encodings.base import QuantConfig, ct_scheme

    expert = "model.layers.3.mlp.experts.5.down_proj"
    groups = {"by_class": {"targets": ["Linear"], "weights": {"num_bits": 8}},
              "by_regex": {"targets": [r"re:.*experts\.5\..*"], "weights": {"num_bits": 4}},
              "by_name": {"targets": [expert], "weights": {"num_bits": 2}},
              "class_again": {"targets": ["Linear"], "weights": {"num_bits": 16}}}

    def bits(module: str, ignore: list[str], use: list[str]) -> int | None:
        q = QuantConfig("compressed-tensors", {"ignore": ignore,
                                               "config_groups": {g: groups[g] for g in use}})
        scheme = ct_scheme(q, module)
        return None if scheme is None else scheme.weights["num_bits"]

    assert bits(expert, [], ["by_class", "by_regex", "by_name"]) == 2
    assert bits(expert, [], ["by_class", "by_regex"]) == 4
    assert bits(expert, [], ["by_class", "class_again"]) == 8
    assert bits(expert.replace("experts.5", "experts.6"), [], ["by_regex"]) is None
    assert bits(expert, [expert], ["by_name"]) is None
    assert bits(expert, ["re:.*down_proj"], ["by_name"]) is None
    assert bits(expert, ["Linear"], ["by_class"]) == 8
