"""AIMER scores from `score_checkpoint` equal the definition, for every dtype and layout.

The expected scores come from `tests.helpers.reference.reference_scores`: tensors loaded with
safetensors, each expert's gate, up and down weights concatenated, and
mean(|w|) / sqrt(mean(w^2)) taken in float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import copy_checkpoint
from tests.helpers.reference import EXPERT_WEIGHT_RE, FUSED_RE, INDEX_NAME, aimer_numpy, as_f64, expert_weight_bytes, header_bytes, load_tensors, read_header, reference_scores, shard_names
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.layout import expert_layout
from vllm_aimer.scoring import aimer_score_of, score_checkpoint

FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL = 1e-6


def package_scores(directory, **kwargs):
    ckpt = open_checkpoint(directory)
    return score_checkpoint(ckpt, expert_layout(ckpt), progress=False, **kwargs)


def assert_scores_close(got: dict[int, list[float]], want: dict[int, list[float]], rel=REL):
    assert sorted(got) == sorted(want)
    for layer in want:
        assert len(got[layer]) == len(want[layer])
        np.testing.assert_allclose(got[layer], want[layer], rtol=rel, atol=0,
                                   err_msg=f"layer {layer}")


# --------------------------------------------------------------------------- layouts x dtypes

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_scores_match_definition(tiny_checkpoint, family, dtype):
    model = tiny_checkpoint(family, dtype=dtype)
    names = header_bytes(model)
    projs = {EXPERT_WEIGHT_RE.search(n)["proj"] for n in names if EXPERT_WEIGHT_RE.search(n)}
    want_projs = {"w1", "w2", "w3"} if family == "mixtral" else {"gate_proj", "up_proj", "down_proj"}
    assert projs == want_projs
    assert not any(FUSED_RE.search(n) for n in names)
    result = package_scores(model)
    assert_scores_close(result.scores, reference_scores(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_scores_match_definition(tiny_checkpoint, family):
    model = tiny_checkpoint(family, max_shard_size="1MB")
    assert (model / INDEX_NAME).is_file()
    shards = shard_names(model)
    assert len(shards) >= 2
    # Experts really are spread over several shards (not all in one file).
    with_experts = [s for s in shards
                    if any(EXPERT_WEIGHT_RE.search(n) for n in read_header(model / s))]
    assert len(with_experts) >= 2
    result = package_scores(model)
    assert_scores_close(result.scores, reference_scores(model))
    # Same weights as the single-file checkpoint of the same seed.
    assert_scores_close(result.scores, reference_scores(tiny_checkpoint(family)))


def test_sharded_bfloat16_scores_match_definition(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe", dtype=torch.bfloat16, max_shard_size="1MB")
    assert len(shard_names(model)) >= 2
    assert_scores_close(package_scores(model).scores, reference_scores(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_scores_match_definition(tiny_checkpoint, family):
    model = tiny_checkpoint(family, fused=True)
    tensors = load_tensors(model)
    fused = {n: t.shape for n, t in tensors.items() if FUSED_RE.search(n)}
    assert fused, "expected fused expert tensors"
    assert not any(EXPERT_WEIGHT_RE.search(n) for n in tensors)
    for name, shape in fused.items():
        if name.endswith("gate_up_proj"):
            assert tuple(shape) == (16, 128, 64)  # [E, 2I, H]
        else:
            assert tuple(shape) == (16, 64, 64)
    result = package_scores(model)
    want = reference_scores(model)
    assert_scores_close(result.scores, want)
    # The fused checkpoint holds the same weights as the per-expert one of the same seed.
    assert_scores_close(result.scores, reference_scores(tiny_checkpoint(family)))


def test_fused_bfloat16_scores_match_definition(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe", fused=True, dtype=torch.bfloat16)
    assert_scores_close(package_scores(model).scores, reference_scores(model))


def test_fused_transposed_layout_gives_identical_scores(tiny_checkpoint, tmp_path):
    """[E, H, 2I] (and [E, I, H] for down) holds the same entries as [E, 2I, H]."""
    src = tiny_checkpoint("qwen3_moe", fused=True)
    dst = tmp_path / "transposed"
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        out[name] = t.transpose(1, 2).contiguous() if FUSED_RE.search(name) else t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    gate_up = [n for n in out if n.endswith("experts.gate_up_proj")][0]
    assert tuple(out[gate_up].shape) == (16, 64, 128)

    per_layer = package_scores(dst).scores
    # Direct computation on the transposed tensors, concatenated per expert.
    want: dict[int, list[float]] = {}
    for name, t in out.items():
        m = FUSED_RE.search(name)
        if m and m["proj"] == "gate_up_proj":
            down = out[name.replace("gate_up_proj", "down_proj")]
            want[int(m["layer"])] = [
                aimer_numpy(np.concatenate([as_f64(t[e]).ravel(), as_f64(down[e]).ravel()]))
                for e in range(t.shape[0])]
    assert_scores_close(per_layer, want)
    assert_scores_close(per_layer, package_scores(src).scores)


# --------------------------------------------------------------------------- chunking

@pytest.mark.parametrize("kwargs", [{}, {"fused": True}, {"dtype": torch.bfloat16}],
                         ids=["per_expert", "fused", "bf16"])
@pytest.mark.parametrize("chunk", [100, 4097])
def test_chunked_scoring_equals_default(tiny_checkpoint, kwargs, chunk):
    model = tiny_checkpoint("qwen3_moe", **kwargs)
    default = package_scores(model)
    chunked = package_scores(model, chunk_elements=chunk)
    assert_scores_close(chunked.scores, default.scores)
    assert chunked.bytes_read == default.bytes_read


# --------------------------------------------------------------------------- properties

def test_scale_invariance(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    dst = copy_checkpoint(src, tmp_path / "scaled")
    tensors = load_file(src / "model.safetensors")
    scaled = {n: (t * 7.3 if EXPERT_WEIGHT_RE.search(n) else t) for n, t in tensors.items()}
    save_file(scaled, dst / "model.safetensors", metadata={"format": "pt"})
    name = next(n for n in tensors if EXPERT_WEIGHT_RE.search(n))
    assert not torch.equal(load_file(dst / "model.safetensors")[name], tensors[name])
    assert_scores_close(package_scores(dst).scores, package_scores(src).scores)


def test_constant_magnitude_scores_one():
    # Squares of float32 weights are formed in float32 (1 ulp ~ 6e-8), so "exactly 1"
    # holds to ~1e-8; the scoring contract is 1e-6 relative.
    n = 1000
    signs = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    assert aimer_score_of([signs * 0.37]) == pytest.approx(1.0, rel=1e-7)
    # Split over gate/up/down-like pieces of different shapes.
    assert aimer_score_of([torch.full((4, 5), -2.5), torch.full((10,), 2.5),
                           torch.full((2, 3), 2.5)]) == pytest.approx(1.0, rel=1e-7)


@pytest.mark.parametrize("n", [1, 7, 4096, 12288])
def test_one_hot_scores_inverse_sqrt_n(n):
    w = torch.zeros(n)
    w[n // 2] = -3.0
    assert aimer_score_of([w]) == pytest.approx(1.0 / math.sqrt(n), rel=1e-9)


def laplace(n: int, g: torch.Generator) -> torch.Tensor:
    """Laplace(0, 1) samples from a seeded generator (sign times an exponential)."""
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return sign * -torch.log1p(-torch.rand(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "power"])
def test_random_vectors_lie_inside_the_range(dist):
    g = torch.Generator().manual_seed(3)
    n = 3 * 64 * 64
    u = torch.randn(n, generator=g, dtype=torch.float64)
    w = {"normal": u,
         "laplace": laplace(n, g),
         "uniform": torch.rand(n, generator=g, dtype=torch.float64) - 0.5,
         "power": u.sign() * u.abs().pow(3)}[dist]
    parts = [w[: n // 3].reshape(64, 64), w[n // 3: 2 * n // 3].reshape(64, 64),
             w[2 * n // 3:].reshape(64, 64)]
    s = aimer_score_of([p.float() for p in parts])
    assert 1.0 / math.sqrt(n) < s < 1.0
    assert s == pytest.approx(aimer_numpy(w.float().double().numpy()), rel=REL)


def test_gaussian_and_laplace_reference_values():
    """The notes: Gaussian weights score about sqrt(2/pi), Laplace about 1/sqrt(2)."""
    g = torch.Generator().manual_seed(5)
    gauss = torch.randn(200_000, generator=g)
    lap = laplace(200_000, g).float()
    assert aimer_score_of([gauss]) == pytest.approx(math.sqrt(2 / math.pi), abs=5e-3)
    assert aimer_score_of([lap]) == pytest.approx(1 / math.sqrt(2), abs=5e-3)


@pytest.mark.parametrize("kwargs", [{}, {"dtype": torch.bfloat16}, {"dtype": torch.float16},
                                    {"fused": True}],
                         ids=["f32", "bf16", "f16", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_scores_are_well_separated(tiny_checkpoint, family, kwargs):
    """Selections on the tiny models are unambiguous: distinct experts' scores differ by > 1e-3."""
    scores = reference_scores(tiny_checkpoint(family, **kwargs))
    assert len(scores) == 4
    for layer, s in scores.items():
        assert len(s) == 16
        gaps = np.diff(np.sort(np.asarray(s)))
        assert gaps.min() > 1e-3, f"layer {layer}: min gap {gaps.min()}"


# --------------------------------------------------------------------------- bytes read

@pytest.mark.parametrize("kwargs", [{}, {"max_shard_size": "1MB"}, {"fused": True},
                                    {"dtype": torch.bfloat16}],
                         ids=["single", "sharded", "fused", "bf16"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_score_reads_only_expert_weights(tiny_checkpoint, family, kwargs):
    model = tiny_checkpoint(family, **kwargs)
    want = expert_weight_bytes(model)
    everything = sum(header_bytes(model).values())
    assert 0 < want < everything  # the checkpoint also holds attention, router, embeddings
    assert package_scores(model).bytes_read == want


def test_scores_cover_every_layer_and_expert(tiny_checkpoint):
    model = tiny_checkpoint("olmoe", num_layers=3, num_experts=8, top_k=2)
    result = package_scores(model)
    assert sorted(result.scores) == [0, 1, 2]
    assert all(len(s) == 8 for s in result.scores.values())
    assert result.seconds >= 0
    assert_scores_close(result.scores, reference_scores(model))


def test_score_precision_on_a_default_sized_chunk():
    """One expert of 3 x 512 x 1024 float32 entries (a 1M-element default chunk per
    projection, like a real model's): the score must still match float64 within 1e-6."""
    g = torch.Generator().manual_seed(11)
    parts = [torch.randn(512, 1024, generator=g) * 0.02 for _ in range(3)]
    want = aimer_numpy(np.concatenate([p.double().numpy().ravel() for p in parts]))
    assert aimer_score_of(parts) == pytest.approx(want, rel=REL)


# --------------------------------------------------------------------------- threads, kernel

LAYOUTS = [{}, {"dtype": torch.bfloat16}, {"dtype": torch.float16}, {"fused": True},
           {"dtype": torch.bfloat16, "max_shard_size": "1MB"}]
LAYOUT_IDS = ["f32", "bf16", "f16", "fused", "bf16-sharded"]


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=LAYOUT_IDS)
def test_scores_are_identical_for_any_thread_count(tiny_checkpoint, kwargs):
    """Each projection's sums are computed on their own and merged in a fixed order, so
    the thread count changes nothing, not even the last bit (small chunks: many pieces
    per tensor, finished in a different order by each pool)."""
    model = tiny_checkpoint("qwen3_moe", **kwargs)
    runs = [package_scores(model, threads=n, chunk_elements=999) for n in (1, 2, 8)]
    assert [r.threads for r in runs] == [1, 2, 8]
    assert runs[0].scores == runs[1].scores == runs[2].scores
    assert runs[0].magnitudes == runs[1].magnitudes == runs[2].magnitudes
    assert_scores_close(runs[2].scores, reference_scores(model))
    # The default (one thread per CPU, at least 4) gives the same scores too.
    assert package_scores(model, chunk_elements=999).scores == runs[0].scores


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded toward zero to bfloat16, as the stored uint16 bits."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 1023, 4097])
@pytest.mark.parametrize("offset", [0, 1])
def test_float_sums_of_every_plain_dtype_match_float64(n, offset):
    """The kernel on odd lengths (the last bf16 value on its own), chunks that are not
    whole runs of 256, and views that start at an odd element (unaligned for the uint32
    view of bf16 pairs), against float64 sums from the definition. Each sum within
    5e-7 relative keeps the score within 1e-6 (score error <= err(|w|) + err(w^2) / 2);
    float32 runs of 256 measure up to ~1e-7 here (outliers dominate every 7th value)."""
    from vllm_aimer.encodings.reduce import float_sums

    g = np.random.default_rng(n + offset)
    x = (g.standard_normal(n + offset) * 0.02).astype(np.float64)
    x[::7] *= -30.0
    for dtype, stored, values in [
            ("F32", x.astype(np.float32), x.astype(np.float32).astype(np.float64)),
            ("F16", x.astype(np.float16), x.astype(np.float16).astype(np.float64)),
            ("F64", x, x),
            ("BF16", _bf16_bits(x),
             (_bf16_bits(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64))]:
        a, q = float_sums(stored[offset:], dtype)
        v = values[offset:]
        assert a == pytest.approx(np.abs(v).sum(), rel=5e-7), dtype
        assert q == pytest.approx((v * v).sum(), rel=5e-7), dtype


def test_scoring_device_on_a_machine_without_a_gpu():
    """Here there is no GPU: auto stays on the CPU and says why; asking for cuda is an
    error that names the fix, not a silent fallback."""
    from vllm_aimer.errors import AimerError
    from vllm_aimer.scoring import scoring_device

    assert scoring_device("cpu") == ("cpu", "CPU requested")
    device, why = scoring_device("auto")
    assert device == "cpu" and ("no CUDA device" in why or "torch is not loaded" in why)
    if not torch.cuda.is_available():
        for requested in ("cuda", "cuda:0"):
            with pytest.raises(AimerError, match="no CUDA device"):
                scoring_device(requested)
    with pytest.raises(AimerError, match="not one of"):
        scoring_device("tpu")


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("buffer_bytes", [1000, 1 << 20])
def test_gpu_packing_gives_the_definition(tiny_checkpoint, kwargs, buffer_bytes):
    """The GPU path's packing (projections padded to runs of 256 in a staging buffer,
    split across buffers when larger, per-run sums added per projection) run with
    device "cpu": the same code and arithmetic, without pinned memory and CUDA streams,
    which only a GPU machine exercises (benchmarks/device_scoring.py checks them there
    against the CPU scores)."""
    from vllm_aimer.gpu_scoring import device_sums
    from vllm_aimer.scoring import aimer_score
    from vllm_aimer.shards import Shards

    model = tiny_checkpoint("qwen3_moe", **kwargs)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    items = [(st, layout.num_experts) for layer in layout.layers for st in layout.scored[layer]]
    shards = Shards(ckpt)
    try:
        parts = device_sums(shards, items, "cpu", threads=2, buffer_bytes=buffer_bytes)
    finally:
        shards.close()
    totals = {layer: [[0.0, 0.0, 0] for _ in range(layout.num_experts)] for layer in layout.layers}
    for (st, _), part in zip(items, parts):
        layer = next(layer for layer in layout.layers if st in layout.scored[layer])
        slots = range(layout.num_experts) if st.expert is None else [st.expert]
        for e, s in zip(slots, part):
            t = totals[layer][e]
            t[0], t[1], t[2] = t[0] + s.abs_sum, t[1] + s.sq_sum, t[2] + s.numel
    got = {layer: [aimer_score(*t) for t in ts] for layer, ts in totals.items()}
    assert_scores_close(got, reference_scores(model))


# Whole blocks: block FP8's threaded numpy path (the case that looks like plain float work).
@pytest.mark.parametrize("kwargs", [{"fp8_block": (32, 32)}, {"fp8_block": (16, 16), "fused": True}],
                         ids=["fp8-block", "fp8-block-fused"])
def test_gpu_path_leaves_quantized_projections_to_their_decoders(tiny_checkpoint, kwargs,
                                                                 monkeypatch):
    """score_checkpoint(device="cuda") hands only plain float projections to the GPU
    reduction; block FP8 (threaded on the CPU, but packed codes with scales) stays with
    its decoder. No GPU here: the reduction runs its own code with device "cpu" (the
    only stand-in), and the scores must equal the CPU path's."""
    import vllm_aimer.gpu_scoring as gpu_scoring
    from vllm_aimer.scoring import score_checkpoint

    real = gpu_scoring.device_sums
    handed: list[str] = []

    def on_cpu(shards, items, device, threads, **kw):
        assert device == "cuda"
        handed.extend(st.info.dtype for st, _ in items)
        return real(shards, items, "cpu", threads, **kw)

    monkeypatch.setattr(gpu_scoring, "device_sums", on_cpu)
    model = tiny_checkpoint("qwen3_moe", **kwargs)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    assert all(st.scorer.threaded for layer in layout.layers for st in layout.scored[layer])
    got = score_checkpoint(ckpt, layout, device="cuda").scores
    assert "F8_E4M3" not in handed
    assert got == score_checkpoint(ckpt, layout, device="cpu").scores
