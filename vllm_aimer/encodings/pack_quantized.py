"""compressed-tensors `pack-quantized` (W4A16/W8A16, llm-compressor's GPTQ/AWQ output,
Kimi-K2-Thinking/K2.5 int4): `<proj>.weight_packed` int32 [R, ceil(C / (32/b))] holds
b-bit codes along each row, low bits first, stored as code + 2^(b-1);
`weight_scale` [R, groups] (group) or [R, 1] (channel); `weight_shape` = (R, C);
asymmetric schemes add `weight_zero_point` int32 packed along dim 0; act-order group
schemes add `weight_g_idx` [C] (column -> group).

Dequantized value = (code - zero) x scale[r, group(c)], zero = 0 when symmetric
(compressed-tensors `unpack_from_int32` + `dequantize`; vLLM's WNA16 MoE method)."""

from __future__ import annotations

from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (Encoding, MatrixScorer, Projection, QuantConfig, Sums,
                                       abs_sq_sums, ceil_div, codes_u8, col_group_sums,
                                       ct_scheme, f64, has, only, refuse, row_spans,
                                       unpack_int32)

__all__ = ["ENCODING", "SUFFIXES", "PackQuantizedScorer"]

SUFFIXES = frozenset({"weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                      "weight_g_idx", "bias"})


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return (not proj.fused and proj.dtype("weight_packed") == "I32"
            and has(proj, "weight_scale", "weight_shape") and only(proj, SUFFIXES))


class PackQuantizedScorer(MatrixScorer):
    """pack-quantized codes less their offset or zero point, times their group's or
    row's scale; `add` raises AimerError when `weight_shape` does not fit the packed
    tensor and scales."""

    def __init__(self, proj: Projection, bits: int, group: int | None, groups: int,
                 symmetric: bool) -> None:
        t = proj.tensors
        self.packed, self.scale, self.shape = t["weight_packed"], t["weight_scale"], t["weight_shape"]
        self.zero, self.g_idx = t.get("weight_zero_point"), t.get("weight_g_idx")
        super().__init__(proj, *(x for x in (self.packed, self.scale, self.shape, self.zero,
                                             self.g_idx) if x is not None))
        self.bits, self.group, self.groups, self.symmetric = bits, group, groups, symmetric

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        rows, cols = (int(v) for v in f.get_tensor(self.shape.name).reshape(-1).tolist())
        per = 32 // self.bits
        if (rows, ceil_div(cols, per)) != tuple(self.packed.shape) or (
                self.group and ceil_div(cols, self.group) != self.groups):
            raise refuse(self.proj, f"{self.shape.name} says ({rows}, {cols}), which does not "
                         f"fit {self.packed.name} {list(self.packed.shape)} and {self.groups} "
                         "scale groups.", "check the checkpoint's tensors.")
        scale = f64(f.get_tensor(self.scale.name))
        offset = float(1 << (self.bits - 1))
        zero = (codes_u8(f.get_tensor(self.zero.name).t(), self.bits).t()[:rows].to(torch.float32)
                if self.zero is not None else None)
        sl = f.get_slice(self.packed.name)
        group = self.group or cols
        if self.g_idx is None and cols % group == 0:
            # Groups of `group` consecutive columns: reduce codes group by group.
            for span in row_spans(rows, cols, chunk_elements):
                c = codes_u8(sl[span], self.bits)[:, :cols].to(torch.float32)
                c = c.view(c.shape[0], self.groups, group)
                # Stored values carry +2^(b-1); asymmetric zero points carry it too.
                v = c - (zero[span][..., None] if zero is not None else offset)
                a, q = abs_sq_sums(v, 2)
                sc = scale[span]
                acc.add_totals(float((a * sc.abs()).sum()), float((q * sc * sc).sum()), v.numel())
            return
        g_idx = (f.get_tensor(self.g_idx.name).to(torch.long) if self.g_idx is not None
                 else torch.arange(cols) // group)
        for span in row_spans(rows, cols, chunk_elements):
            q = f64(unpack_int32(sl[span], self.bits, 1)[:, :cols])
            v = q - f64(zero[span])[:, g_idx] if zero is not None else q - offset
            a, s2 = col_group_sums(v, g_idx, self.groups)
            sc = scale[span]
            acc.add_totals(float((a * sc.abs()).sum()), float((s2 * sc * sc).sum()), v.numel())


def _scorer(quant: QuantConfig, proj: Projection) -> PackQuantizedScorer:
    scheme = ct_scheme(quant, proj.module) if quant.method == "compressed-tensors" else None
    w = scheme.weights if scheme else {}
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if (scheme is None or scheme.format not in ("pack-quantized", None) or w.get("type") != "int"
            or not isinstance(bits, int) or not 1 <= bits <= 8 or strategy not in ("group", "channel")):
        raise refuse(proj, f"pack-quantized tensors under quant_method {quant.method!r} with scheme "
                     f"{dict(w) if w else 'none'}; vllm-aimer reads compressed-tensors "
                     "pack-quantized int weights (1..8 bits, per group or channel).",
                     "check quantization_config in config.json, or pass a plan file (a plan "
                     "needs no scores).")
    packed, scale = proj.tensors["weight_packed"], proj.tensors["weight_scale"]
    rows = packed.shape[0]
    per = 32 // bits
    group = w.get("group_size") if strategy == "group" else None
    if strategy == "group" and not isinstance(group, int):
        raise refuse(proj, "a group scheme without group_size.", "check quantization_config.")
    # Column count lies in ((packed cols - 1) * per, packed cols * per]; weight_shape,
    # read when scoring, pins it down.
    max_cols = packed.shape[1] * per
    groups = ceil_div(max_cols, group) if group else 1
    if len(scale.shape) != 2 or scale.shape[0] != rows or (
            group and not ceil_div((packed.shape[1] - 1) * per + 1, group) <= scale.shape[1] <= groups) or (
            not group and scale.shape[1] != 1):
        raise refuse(proj, f"{scale.name} has shape {list(scale.shape)}, which does not fit "
                     f"{packed.name} {list(packed.shape)} ({bits}-bit, {strategy}"
                     f"{f' of {group}' if group else ''}).",
                     "check quantization_config against the checkpoint's tensors.")
    symmetric = w.get("symmetric", True)
    zero = proj.tensors.get("weight_zero_point")
    if symmetric == (zero is not None):
        raise refuse(proj, f"the scheme says symmetric={symmetric}, but weight_zero_point is "
                     f"{'present' if symmetric else 'absent'}.", "check quantization_config.")
    if zero is not None and tuple(zero.shape) != (ceil_div(rows, per), scale.shape[1]):
        raise refuse(proj, f"{zero.name} has shape {list(zero.shape)}, expected "
                     f"{[ceil_div(rows, per), scale.shape[1]]} (packed along rows).",
                     "check the checkpoint's tensors.")
    g_idx = proj.tensors.get("weight_g_idx")
    if g_idx is not None and (len(g_idx.shape) != 1 or not (
            (packed.shape[1] - 1) * per < g_idx.shape[0] <= max_cols)):
        raise refuse(proj, f"{g_idx.name} has shape {list(g_idx.shape)}, not one group per column.",
                     "check the checkpoint's tensors.")
    return PackQuantizedScorer(proj, bits, group, scale.shape[1], symmetric)


ENCODING = Encoding(
    name="pack-quantized", label="compressed-tensors pack-quantized INT4/INT8 (`weight_packed` + "
    "`weight_scale` + `weight_shape` [+ `weight_zero_point`, `weight_g_idx`])",
    suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
