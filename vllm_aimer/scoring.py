"""AIMER expert scores, computed straight from safetensors files.

score(w) = mean(|w|) / sqrt(mean(w^2)) = ||w||_1 / (sqrt(N) ||w||_2) over the
concatenated gate, up and down weights of one expert. It lies in
[1/sqrt(N), 1] and does not change when w is scaled. Tensors are read in
bounded chunks, so memory stays flat however large the experts are; sums are
summed in float32 runs of 256 entries and in float64 across runs and chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.layout import ExpertLayout

CHUNK_ELEMENTS = 1 << 20
"""About 4 MiB of float32 per reduction: cache-sized, and far faster than
reducing whole tensors (see ../shared notes: ~4x on this CPU)."""


def aimer_score(abs_sum: float, sq_sum: float, numel: int) -> float:
    """The AIMER score from the sums of |w| and w^2 over `numel` entries.

    An all-zero expert has no defined ratio; it is scored 1.0 (the flattest
    possible), so it is the first to be pruned, which is what a dead expert deserves.
    """
    if numel <= 0:
        raise ValueError("an expert must have at least one weight")
    if sq_sum <= 0.0:
        return 1.0
    score = (abs_sum / numel) / math.sqrt(sq_sum / numel)
    # Rounding can step a hair outside the mathematical range; keep the invariant.
    return min(1.0, max(1.0 / math.sqrt(numel), score))


def aimer_score_of(tensors: Iterable[torch.Tensor]) -> float:
    """AIMER score of tensors already in memory (used by tools and tests)."""
    acc = _Sums()
    for t in tensors:
        acc.add(t)
    return acc.score()


@dataclass
class _Sums:
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    numel: int = 0

    def add(self, chunk: torch.Tensor) -> None:
        x = chunk.reshape(-1)
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        self.abs_sum += _sum64(x.abs())
        self.sq_sum += _sum64(x * x)
        self.numel += x.numel()

    def add_totals(self, abs_sum: float, sq_sum: float, numel: int) -> None:
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        self.numel += numel

    def score(self) -> float:
        return aimer_score(self.abs_sum, self.sq_sum, self.numel)


# FP4 (E2M1) code points; a byte holds two, low nibble first.
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
_BYTES = torch.arange(256)
# Per byte: the sum of |v| and of v^2 over its two FP4 values (exact in float64).
_FP4_ABS = _FP4[_BYTES & 0xF].abs() + _FP4[_BYTES >> 4].abs()
_FP4_SQ = _FP4[_BYTES & 0xF] ** 2 + _FP4[_BYTES >> 4] ** 2


def _add_mxfp4(acc: _Sums, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Add MXFP4 values [rows, groups, 16] with E8M0 exponents [rows, groups].

    The dequantized value is v * 2^(e - 127), so per group of 32 the sums of |w| and
    w^2 are 2^(e-127) * sum|v| and 4^(e-127) * sum v^2: the exact sums of the
    dequantized weights, without materialising them."""
    idx = blocks.to(torch.long)
    exp = scales.to(torch.float64) - 127.0
    abs_sum = float((_FP4_ABS[idx].sum(-1) * torch.exp2(exp)).sum())
    sq_sum = float((_FP4_SQ[idx].sum(-1) * torch.exp2(2.0 * exp)).sum())
    acc.add_totals(abs_sum, sq_sum, blocks.numel() * 2)


def _add_fp8(acc: _Sums, sl, scale_sl, shape: tuple[int, ...], block: tuple[int, int],
             chunk_elements: int, lead: tuple[int, ...] = ()) -> None:
    """Add a block-quantized FP8 weight [rows, cols] (at index `lead` of a fused tensor
    and of its scales), dequantized (weight x its block's scale) in chunks of whole
    block rows."""
    rows, cols = shape
    br, bc = block
    step = br * max(1, chunk_elements // max(1, br * cols))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        # The product of an FP8 value and a float32 scale is exact in float64; `add`
        # then sums it like any other chunk.
        w = sl[(*lead, slice(start, stop))].to(torch.float64)
        s = scale_sl[(*lead, slice(start // br, -(-stop // br)))].to(torch.float64)
        s = s.repeat_interleave(br, dim=0)[:stop - start].repeat_interleave(bc, dim=1)[:, :cols]
        acc.add(w * s)


_PARTIAL = 256


def _sum64(v: torch.Tensor) -> float:
    """Sum in float32 runs of 256, then in float64 across runs: as accurate as a
    float64 sum here (~1e-10 relative) at float32 speed (7x faster than upcasting the
    chunk). Plain float32 sums, torch.dot and vector_norm drift by up to ~1e-5."""
    whole = v.numel() - v.numel() % _PARTIAL
    total = float(v[:whole].view(-1, _PARTIAL).sum(1).to(torch.float64).sum())
    return total + float(v[whole:].to(torch.float64).sum())


@dataclass(frozen=True)
class ScoringResult:
    scores: dict[int, list[float]]
    """Per MoE layer, the score of each routed expert (index = expert id)."""
    seconds: float
    bytes_read: int
    magnitudes: dict[int, list[float]] | None = None
    """Per MoE layer, each expert's L2 norm sqrt(sum w^2) over the same weights (the
    magnitude baseline, vllm_aimer.criteria), from the same pass."""


def _row_spans(rows: int, row_numel: int, chunk_elements: int) -> Iterator[slice]:
    """Consecutive row slices of about `chunk_elements` elements each."""
    step = max(1, chunk_elements // max(1, row_numel))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _chunks(sl, first: tuple[int, ...], rows: int, row_numel: int, chunk_elements: int):
    """Slices of `rows` rows (after the fixed leading indices `first`)."""
    for span in _row_spans(rows, row_numel, chunk_elements):
        yield sl[(*first, span)]


def score_checkpoint(
    ckpt: Checkpoint,
    layout: ExpertLayout,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: bool = True,
    layers: Iterable[int] | None = None,
) -> ScoringResult:
    """Score every routed expert of every MoE layer (trunk and MTP), or of `layers`
    only; reads only expert weights."""
    start = time.perf_counter()
    wanted = tuple(layout.all_layers if layers is None else layers)
    sums = {layer: [_Sums() for _ in range(layout.num_experts)] for layer in wanted}
    by_file: dict[str, list] = {}
    for layer in wanted:
        for st in layout.scored[layer]:
            by_file.setdefault(st.info.file, []).append((layer, st))
    total = sum(st.info.nbytes for items in by_file.values() for _, st in items)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="AIMER scoring experts",
               disable=not progress, delay=1.0)
    bytes_read = 0
    try:
        for file in sorted(by_file):
            with safe_open(ckpt.path(file), framework="pt") as f:
                for layer, st in by_file[file]:
                    sl = f.get_slice(st.info.name)
                    shape = st.info.shape
                    if st.scale is not None:
                        scale_sl = f.get_slice(st.scale.name)
                        if st.expert is not None:
                            _add_fp8(sums[layer][st.expert], sl, scale_sl, shape, st.block,
                                     chunk_elements)
                        else:
                            for expert in range(shape[0]):
                                _add_fp8(sums[layer][expert], sl, scale_sl, shape[1:],
                                         st.block, chunk_elements, (expert,))
                        bytes_read += st.scale.nbytes
                    elif st.mxfp4_scales is not None:
                        scale_sl = f.get_slice(st.mxfp4_scales.name)
                        for expert in range(shape[0]):
                            for rows in _row_spans(shape[1], shape[2] * shape[3],
                                                   chunk_elements):
                                _add_mxfp4(sums[layer][expert], sl[expert, rows],
                                           scale_sl[expert, rows])
                        bytes_read += st.mxfp4_scales.nbytes
                    elif st.expert is not None:
                        row_numel = st.info.numel // max(1, shape[0])
                        acc = sums[layer][st.expert]
                        for chunk in _chunks(sl, (), shape[0], row_numel, chunk_elements):
                            acc.add(chunk)
                    else:
                        inner = shape[1] if len(shape) > 1 else 1
                        row_numel = st.info.numel // max(1, shape[0] * inner)
                        for expert in range(shape[0]):
                            acc = sums[layer][expert]
                            if len(shape) == 1:
                                acc.add(sl[expert:expert + 1])
                                continue
                            for chunk in _chunks(sl, (expert,), inner, row_numel, chunk_elements):
                                acc.add(chunk)
                    bytes_read += st.info.nbytes
                    bar.update(st.info.nbytes)
    finally:
        bar.close()
    scores = {layer: [s.score() for s in sums[layer]] for layer in wanted}
    norms = {layer: [math.sqrt(s.sq_sum) for s in sums[layer]] for layer in wanted}
    return ScoringResult(scores, time.perf_counter() - start, bytes_read, norms)
