"""MXFP4 (OCP microscaling): FP4 (E2M1) codes two per byte (low nibble first) with one
E8M0 exponent (bias 127) per 32 values.

- gpt-oss (quant_method mxfp4), fused: `experts.<proj>_blocks` uint8 [E, R, C/32, 16]
  + `experts.<proj>_scales` uint8 [E, R, C/32] (+ `<proj>_bias`).
- per expert, compressed-tensors `mxfp4-pack-quantized`: `<proj>.weight_packed` uint8
  [R, C/2] + `weight_scale` uint8 or F8_E8M0 [R, C/32].

Dequantized value = e2m1 x 2^(e - 127) (vLLM mxfp4_utils; compressed-tensors'
`decompress_mx_scale`). Per group of 32 the sums are 2^(e-127) sum|v| and
4^(e-127) sum v^2, the exact sums of the dequantized weights."""

from __future__ import annotations

from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (Encoding, MatrixScorer, Projection, QuantConfig, Sums,
                                       add_fp4_groups, has, only, refuse, require_ct_fp4_scheme,
                                       row_spans)

__all__ = ["ENCODING", "GROUP", "SUFFIXES", "FUSED_SUFFIXES", "SCALE_DTYPES", "exponents",
           "Mxfp4Scorer"]

GROUP = 32
SUFFIXES = frozenset({"weight_packed", "weight_scale", "bias"})
FUSED_SUFFIXES = frozenset({"_blocks", "_scales", "_bias"})
SCALE_DTYPES = ("U8", "F8_E8M0")


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    if proj.fused:
        return has(proj, "_blocks") and only(proj, FUSED_SUFFIXES)
    return (proj.dtype("weight_packed") == "U8" and proj.dtype("weight_scale") in SCALE_DTYPES
            and only(proj, SUFFIXES))


def exponents(t: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8 or float8_e8m0fnu) as float64 exponents e - 127."""
    return t.view(torch.uint8).to(torch.float64) - 127.0


class Mxfp4Scorer(MatrixScorer):
    """MXFP4 values times 2^(e - 127) per group of 32, fused (gpt-oss) or per expert."""

    def __init__(self, proj: Projection) -> None:
        main, scale = ("_blocks", "_scales") if proj.fused else ("weight_packed", "weight_scale")
        self.packed, self.scale = proj.tensors[main], proj.tensors[scale]
        super().__init__(proj, self.packed, self.scale)

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        sl, ssl = f.get_slice(self.packed.name), f.get_slice(self.scale.name)
        rows = self.packed.shape[len(lead)]
        groups = self.scale.shape[-1]
        for span in row_spans(rows, groups * GROUP, chunk_elements):
            packed = sl[(*lead, span)].view(torch.uint8).reshape(-1, groups, GROUP // 2)
            add_fp4_groups(acc, packed, torch.exp2(exponents(ssl[(*lead, span)])).reshape(-1, groups))


def _scorer(quant: QuantConfig, proj: Projection) -> Mxfp4Scorer:
    if proj.fused:
        blocks, scales = proj.tensors["_blocks"], proj.tensors.get("_scales")
        if (blocks.dtype != "U8" or scales is None or scales.dtype not in SCALE_DTYPES
                or len(blocks.shape) != 4 or blocks.shape[-1] != GROUP // 2
                or tuple(scales.shape) != tuple(blocks.shape[:-1])):
            raise refuse(proj, f"MXFP4 `_blocks` must come with `_scales` of shape "
                         f"{list(blocks.shape[:-1])} in uint8 (two FP4 values per byte, one "
                         "E8M0 exponent per 32 values); AIMER scores dequantized weights.",
                         "use the checkpoint as released (gpt-oss MXFP4 layout) or its BF16 "
                         "release.")
        return Mxfp4Scorer(proj)
    require_ct_fp4_scheme(quant, proj, GROUP,
                          "MXFP4-style tensors (weight_packed uint8 + E8M0 weight_scale)")
    packed, scale = proj.tensors["weight_packed"], proj.tensors["weight_scale"]
    if (len(packed.shape) != 2 or packed.shape[1] % (GROUP // 2)
            or tuple(scale.shape) != (packed.shape[0], packed.shape[1] // (GROUP // 2))):
        raise refuse(proj, "MXFP4 expects packed [R, C/2] with C a multiple of 32 and scales "
                     "[R, C/32].", "use the checkpoint as released.")
    return Mxfp4Scorer(proj)


ENCODING = Encoding(
    name="mxfp4", label="MXFP4 (gpt-oss fused `_blocks` + `_scales`; compressed-tensors "
    "`weight_packed` + E8M0 `weight_scale` per expert)",
    suffixes=SUFFIXES, fused_suffixes=FUSED_SUFFIXES, matches=_matches, scorer=_scorer)
