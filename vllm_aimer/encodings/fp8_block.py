"""Block-quantized FP8 (DeepSeek-V3, Qwen3-FP8, MiniMax-M2; quant_method `fp8` with
`weight_block_size`): `<proj>.weight` float8 [R, C] with `<proj>.weight_scale_inv`
float32 [ceil(R/br), ceil(C/bc)], one scale per (br, bc) block; fused
`experts.<proj>` [E, R, C] with `experts.<proj>_scale_inv` [E, ...].

Dequantized value = code x its block's scale (vLLM fp8_utils / DeepSeek's
`weight_dequant`: the stored "scale_inv" multiplies)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_aimer.lazy import torch

from vllm_aimer.dtypes import FP8_DTYPES
from vllm_aimer.encodings.base import (Encoding, MatrixScorer, Projection, QuantConfig, Sums,
                                       add_block_scaled, ceil_div, f64, has, only, refuse,
                                       row_spans)
from vllm_aimer.encodings.reduce import rowdot, scratch

__all__ = ["ENCODING", "SUFFIXES", "FUSED_SUFFIXES", "DEFAULT_BLOCK", "block_size",
           "BlockFp8Scorer", "fp8_e4m3_block_sums"]

SUFFIXES = frozenset({"weight", "weight_scale_inv", "input_scale", "bias"})
FUSED_SUFFIXES = frozenset({"", "_scale_inv", "_bias"})
DEFAULT_BLOCK = (128, 128)


def block_size(quant: QuantConfig) -> tuple[int, int]:
    """(rows, columns) of a scale block: the config's weight_block_size, else DEFAULT_BLOCK."""
    block = quant.raw.get("weight_block_size")
    if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block):
        return block[0], block[1]
    return DEFAULT_BLOCK


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    if proj.fused:
        return proj.dtype("") in FP8_DTYPES and has(proj, "_scale_inv") and only(proj, FUSED_SUFFIXES)
    return (proj.dtype("weight") in FP8_DTYPES and has(proj, "weight_scale_inv")
            and only(proj, SUFFIXES))


class BlockFp8Scorer(MatrixScorer):
    """Block-FP8 codes times their block's scale, per expert or fused (dim 0)."""

    def __init__(self, proj: Projection, block: tuple[int, int]) -> None:
        main, scale = ("", "_scale_inv") if proj.fused else ("weight", "weight_scale_inv")
        self.weight, self.scale = proj.tensors[main], proj.tensors[scale]
        super().__init__(proj, self.weight, self.scale)
        self.block = block
        rows, cols = self.weight.shape[-2:]
        # The common case (E4M3 codes, float32 scales, whole blocks, word-aligned rows)
        # reads the memory maps in numpy on worker threads (`fp8_e4m3_block_sums`);
        # anything else decodes with torch, one thread.
        self.threaded = (self.weight.dtype == "F8_E4M3" and self.scale.dtype == "F32"
                         and rows % block[0] == 0 and cols % block[1] == 0
                         and block[1] % 4 == 0 and self.weight.offset % 4 == 0)

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        if self.threaded:
            self._add_mapped(f, acc, lead, chunk_elements)
            return
        sl, ssl = f.get_slice(self.weight.name), f.get_slice(self.scale.name)
        rows, cols = self.weight.shape[-2:]
        br, bc = self.block
        for span in row_spans(rows, cols, chunk_elements, align=br):
            w = sl[(*lead, span)].to(torch.float32)
            s = f64(ssl[(*lead, slice(span.start // br, ceil_div(span.stop, br)))])
            add_block_scaled(acc, w, s, self.block)

    def _add_mapped(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        rows, cols = self.weight.shape[-2:]
        br, bc = self.block
        first = lead[0] * rows if lead else 0  # this expert's first row in the tensor
        codes = f.array(self.weight).view(np.uint8).reshape(-1, cols)
        scales = f.array(self.scale).reshape(-1, cols // bc)
        for span in row_spans(rows, cols, chunk_elements, align=br):
            a, q = fp8_e4m3_block_sums(codes[first + span.start:first + span.stop], bc)
            s = scales[(first + span.start) // br:(first + span.stop) // br].astype(np.float64)
            a = a.reshape(-1, br, cols // bc).sum(1)  # rows -> row blocks
            q = q.reshape(-1, br, cols // bc).sum(1)
            acc.add_totals(float((a * np.abs(s)).sum()), float((q * s * s).sum()),
                           (span.stop - span.start) * cols)
            f.release(self.weight, (first + span.start) * cols, (first + span.stop) * cols)


def fp8_e4m3_block_sums(codes: np.ndarray, bc: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and column block of `bc`, the sums of |v| and v^2 of E4M3 codes [r, c]
    (float64 [r, c / bc]). Decoded without a table: a code's 7 magnitude bits placed at
    bit 20 of a float32 word make 2^-120 times its value (normal and subnormal alike),
    so a multiply by 2^120 is exact. Four codes per uint32 word give four arrays, each
    holding every fourth column, whose runs of bc/4 stay within one column block; their
    dot products (float32 runs of bc/4, exact for E4M3's 4-bit mantissas in practice
    to ~1e-8) are added in float64. E4M3's NaN codes (0x7F, 0xFF) would read as 480."""
    r, c = codes.shape
    words = np.ascontiguousarray(codes).reshape(-1).view(np.uint32)
    out = scratch.get(4 * codes.size).view(np.uint32).reshape(4, -1)
    for k, shift in enumerate((20, 12, 4)):
        np.left_shift(words, shift, out=out[k])
        np.bitwise_and(out[k], 0x07F00000, out=out[k])
    np.right_shift(words, 4, out=out[3])
    np.bitwise_and(out[3], 0x07F00000, out=out[3])
    v = out.view(np.float32)
    np.multiply(v, np.float32(2.0 ** 120), out=v)
    runs = v.reshape(-1, bc // 4)
    ones = np.ones(bc // 4, np.float32)
    a = rowdot(runs, ones).reshape(4, r, c // bc).astype(np.float64).sum(0)
    q = rowdot(runs, runs).reshape(4, r, c // bc).astype(np.float64).sum(0)
    return a, q


def _scorer(quant: QuantConfig, proj: Projection) -> BlockFp8Scorer:
    weight = proj.tensors["" if proj.fused else "weight"]
    scale = proj.tensors["_scale_inv" if proj.fused else "weight_scale_inv"]
    block = block_size(quant)
    lead = weight.shape[:1] if proj.fused else ()
    if len(weight.shape) != 2 + len(lead):
        raise refuse(proj, f"a block-FP8 weight must be 2-D per expert, got {list(weight.shape)}.",
                     "use the checkpoint as released.")
    want = (*lead, *(ceil_div(d, b) for d, b in zip(weight.shape[len(lead):], block)))
    if tuple(scale.shape) != want:
        raise refuse(
            proj, f"block scales {scale.name} have shape {list(scale.shape)}, expected "
            f"{list(want)} for weight {list(weight.shape)} in {block[0]}x{block[1]} blocks.",
            "check quantization_config.weight_block_size in config.json.")
    return BlockFp8Scorer(proj, block)


ENCODING = Encoding(
    name="fp8-block", label="block FP8 (`weight` float8 + `weight_scale_inv` per block, "
    "quant_method fp8 with weight_block_size; fused `_scale_inv` too)",
    suffixes=SUFFIXES, fused_suffixes=FUSED_SUFFIXES, matches=_matches, scorer=_scorer)
