"""AutoAWQ GEMM (quant_method `awq`, version gemm, zero_point true): `<proj>.qweight`
int32 [K, N/8] packs 4-bit codes along the output dimension N in AutoAWQ's order (the
code of column 8j + c sits at nibble AWQ_ORDER[c] of word j); `qzeros` int32
[groups, N/8] in the same order; `scales` [groups, N]; input row k is in group
k // group_size.

Dequantized value w[k, n] = (q[k, n] - z[g, n]) x scale[g, n] (AutoAWQ's
`dequantize_gemm`; vLLM moe_wna16's `convert_awq_tensor` uses the same reverse order)."""

from __future__ import annotations

from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (Encoding, GroupBuckets, MatrixScorer, Projection,
                                       QuantConfig, Sums, ceil_div, f64, has, only, refuse,
                                       codes_u8, row_spans)

__all__ = ["ENCODING", "SUFFIXES", "AWQ_ORDER", "PACK_ORDER", "nibble_columns", "AwqScorer"]

SUFFIXES = frozenset({"qweight", "qzeros", "scales", "bias"})
# Column c (mod 8) of a word sits at nibble AWQ_ORDER[c]; AutoAWQ packs columns in the
# order [0, 2, 4, 6, 1, 3, 5, 7] and unpacks with this, its inverse.
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return (not proj.fused and quant.method in ("awq", "awq_marlin")
            and proj.dtype("qweight") == "I32" and has(proj, "scales", "qzeros")
            and only(proj, SUFFIXES))


def nibble_columns(cols: int) -> torch.Tensor:
    """The column each nibble position holds: 8j + i -> 8j + PACK_ORDER[i]."""
    return torch.arange(cols) // 8 * 8 + torch.tensor(PACK_ORDER).repeat(cols // 8)


class AwqScorer(MatrixScorer):
    """AutoAWQ GEMM codes less their zero point, times their group's scale."""

    def __init__(self, proj: Projection, group: int) -> None:
        t = proj.tensors
        self.qweight, self.qzeros, self.scales = t["qweight"], t["qzeros"], t["scales"]
        super().__init__(proj, self.qweight, self.qzeros, self.scales)
        self.group = group

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        rows = self.qweight.shape[0]
        cols = self.qweight.shape[1] * 8
        groups = self.scales.shape[0]
        # Sums do not care about column order: codes and zero points stay in nibble order
        # (both packed alike) and the scales are put in that order instead.
        zero = codes_u8(f.get_tensor(self.qzeros.name), 4).to(torch.float32)
        scale = f64(f.get_tensor(self.scales.name))[:, nibble_columns(cols)]
        buckets = GroupBuckets(groups, cols)
        sl = f.get_slice(self.qweight.name)
        for span in row_spans(rows, cols, chunk_elements):
            g = torch.arange(span.start, span.stop) // self.group
            v = codes_u8(sl[span], 4).to(torch.float32) - zero[g]
            buckets.add_row_sums(v.abs(), v * v, span.start, self.group)
            buckets.numel += v.numel()
        buckets.finish(acc, scale)


def _scorer(quant: QuantConfig, proj: Projection) -> AwqScorer:
    raw = quant.raw
    bits = raw.get("bits", raw.get("w_bit"))
    group = raw.get("group_size", raw.get("q_group_size"))
    version = str(raw.get("version", "gemm")).lower()
    if (quant.method not in ("awq", "awq_marlin") or bits != 4 or not isinstance(group, int)
            or version != "gemm" or raw.get("zero_point", True) is not True):
        raise refuse(proj, f"AWQ-style tensors (qweight/qzeros/scales) under quant_method "
                     f"{quant.method!r}, bits {bits!r}, group_size {group!r}, version {version!r}, "
                     f"zero_point {raw.get('zero_point')!r}; vllm-aimer reads AutoAWQ GEMM "
                     "(4-bit, zero_point true).",
                     "check quantization_config in config.json, or pass a plan file (a plan "
                     "needs no scores).")
    qweight, qzeros, scales = (proj.tensors[s] for s in ("qweight", "qzeros", "scales"))
    rows, cols = qweight.shape[0], qweight.shape[1] * 8
    g = rows if group == -1 else group
    want = {"scales": (ceil_div(rows, g), cols), "qzeros": (ceil_div(rows, g), cols // 8)}
    for name, shape in want.items():
        if tuple(proj.tensors[name].shape) != shape:
            raise refuse(proj, f"{proj.tensors[name].name} has shape "
                         f"{list(proj.tensors[name].shape)}, expected {list(shape)}.",
                         "check quantization_config.group_size against the checkpoint.")
    return AwqScorer(proj, g)


ENCODING = Encoding(
    name="awq", label="AutoAWQ GEMM (`qweight` + `qzeros` + `scales`, 4-bit)",
    suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
