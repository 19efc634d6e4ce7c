"""Block-quantized FP8 (DeepSeek-V3, Qwen3-FP8, MiniMax-M2; quant_method `fp8` with
`weight_block_size`): `<proj>.weight` float8 [R, C] with `<proj>.weight_scale_inv`
float32 [ceil(R/br), ceil(C/bc)], one scale per (br, bc) block; fused
`experts.<proj>` [E, R, C] with `experts.<proj>_scale_inv` [E, ...].

Dequantized value = code x its block's scale (vLLM fp8_utils / DeepSeek's
`weight_dequant`: the stored "scale_inv" multiplies)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.dtypes import FP8_DTYPES
from vllm_aimer.encodings.base import (Encoding, MatrixScorer, Projection, QuantConfig, Sums,
                                       add_block_scaled, ceil_div, f64, has, only, refuse,
                                       row_spans)

SUFFIXES = frozenset({"weight", "weight_scale_inv", "input_scale", "bias"})
FUSED_SUFFIXES = frozenset({"", "_scale_inv", "_bias"})
DEFAULT_BLOCK = (128, 128)


def block_size(quant: QuantConfig) -> tuple[int, int]:
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
    def __init__(self, proj: Projection, block: tuple[int, int]) -> None:
        main, scale = ("", "_scale_inv") if proj.fused else ("weight", "weight_scale_inv")
        self.weight, self.scale = proj.tensors[main], proj.tensors[scale]
        super().__init__(proj, self.weight, self.scale)
        self.block = block

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        sl, ssl = f.get_slice(self.weight.name), f.get_slice(self.scale.name)
        rows, cols = self.weight.shape[-2:]
        br, bc = self.block
        for span in row_spans(rows, cols, chunk_elements, align=br):
            w = sl[(*lead, span)].to(torch.float32)
            s = f64(ssl[(*lead, slice(span.start // br, ceil_div(span.stop, br)))])
            add_block_scaled(acc, w, s, self.block)


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


def encode(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, torch.Tensor]:
    """float8_e4m3fn codes of a 2-D weight and float32 scales [ceil(R/br), ceil(C/bc)]
    (block amax / 448): dequantized value = code x its block's scale."""
    br, bc = block
    w = w.to(torch.float32)
    rows, cols = w.shape
    sr, sc = ceil_div(rows, br), ceil_div(cols, bc)
    padded = torch.zeros(sr * br, sc * bc)
    padded[:rows, :cols] = w
    blocks = padded.reshape(sr, br, sc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(sr * br, sc * bc)[:rows, :cols]
    return {"weight": q.to(torch.float8_e4m3fn).contiguous(),
            "weight_scale_inv": scale.contiguous()}


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> Mapping[str, Any]:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block)}
