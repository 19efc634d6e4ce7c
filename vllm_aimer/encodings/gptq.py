"""GPTQ (AutoGPTQ / GPTQModel, quant_method `gptq`): `<proj>.qweight` int32 [K/(32/b), N]
packs b-bit codes along the input dimension K (row k of the [K, N] = [in, out] matrix
sits in word k // (32/b) at bit offset b * (k % (32/b))); `scales` [groups, N];
`qzeros` int32 [groups, N/(32/b)] packed along N; `g_idx` int32 [K] maps each input
row to its group (act-order, `desc_act`); without it row k is in group k // group_size.

Dequantized value w[k, n] = scale[g, n] x (q[k, n] - z[g, n]) with g = g_idx[k]:
- symmetric (`sym`): z = 2^(b-1), qzeros unread (vLLM's uint4b8/uint8b128 types; the
  stored qzeros of a v1 checkpoint are 2^(b-1) - 1);
- asymmetric, `checkpoint_format` gptq (v1): z = qzeros + 1 (vLLM moe_wna16's
  `convert_gptq_int4_qzeros` adds the 1);
- asymmetric, `checkpoint_format` gptq_v2: z = qzeros."""

from __future__ import annotations

from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (Encoding, GroupBuckets, MatrixScorer, Projection,
                                       QuantConfig, Sums, ceil_div, f64, has, only, refuse,
                                       codes_u8, row_spans, runs_of, unpack_int32)

__all__ = ["ENCODING", "SUFFIXES", "BITS", "GptqScorer"]

SUFFIXES = frozenset({"qweight", "qzeros", "scales", "g_idx", "bias"})
BITS = (2, 4, 8)


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return (not proj.fused and quant.method not in ("awq", "awq_marlin")
            and proj.dtype("qweight") == "I32" and has(proj, "scales") and only(proj, SUFFIXES))


class GptqScorer(MatrixScorer):
    """GPTQ codes less their zero point, times their group's scale (see above); `add`
    raises AimerError when g_idx names a group outside the scales."""

    def __init__(self, proj: Projection, bits: int, group: int, zero_offset: int | None) -> None:
        t = proj.tensors
        self.qweight, self.scales = t["qweight"], t["scales"]
        self.qzeros, self.g_idx = t.get("qzeros"), t.get("g_idx")
        self.zero_offset = zero_offset
        """None: symmetric (z = 2^(b-1)); else z = qzeros + zero_offset."""
        reads = [self.qweight, self.scales]
        if zero_offset is not None and self.qzeros is not None:
            reads.append(self.qzeros)
        if self.g_idx is not None:
            reads.append(self.g_idx)
        super().__init__(proj, *reads)
        self.bits, self.group = bits, group

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        per = 32 // self.bits
        packed_rows, cols = self.qweight.shape
        rows = packed_rows * per
        groups = self.scales.shape[0]
        g_idx = (f.get_tensor(self.g_idx.name).to(torch.long) if self.g_idx is not None
                 else torch.arange(rows) // self.group)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise refuse(self.proj, f"{self.g_idx.name if self.g_idx else 'g_idx'} names groups "
                         f"outside 0..{groups - 1}.", "check the checkpoint's tensors.")
        if self.zero_offset is None:
            zero = torch.full((groups, cols), float(1 << (self.bits - 1)))
        else:
            assert self.qzeros is not None
            zero = codes_u8(f.get_tensor(self.qzeros.name), self.bits)[:, :cols].to(torch.float32)
            zero = zero + self.zero_offset
        buckets = GroupBuckets(groups, cols)
        sl = f.get_slice(self.qweight.name)
        if runs_of(g_idx, self.group) and self.group % per == 0:
            # Groups of `group` consecutive rows: a word's `per` rows share a group, its
            # zero point and its scale, so codes reduce word by word.
            for span in row_spans(packed_rows, cols * per, chunk_elements):
                c = codes_u8(sl[span], self.bits).to(torch.float32)
                v = c.view(-1, cols, per) - zero[g_idx[span.start * per: span.stop * per: per]][..., None]
                buckets.add_row_sums(v.abs().sum(-1), (v * v).sum(-1), span.start,
                                     self.group // per)
                buckets.numel += v.numel()
        else:  # act-order: any row in any group
            for span in row_spans(packed_rows, cols * per, chunk_elements):
                q = f64(unpack_int32(sl[span], self.bits, 0))
                g = g_idx[span.start * per: span.stop * per]
                buckets.add_indexed(q - f64(zero)[g], g)
        buckets.finish(acc, f64(f.get_tensor(self.scales.name)))


def _scorer(quant: QuantConfig, proj: Projection) -> GptqScorer:
    raw = quant.raw
    bits, group = raw.get("bits"), raw.get("group_size")
    fmt = str(raw.get("checkpoint_format") or "gptq").lower()
    if quant.method != "gptq" or bits not in BITS or not isinstance(group, int) or fmt not in (
            "gptq", "gptq_v2"):
        raise refuse(proj, f"GPTQ tensors (qweight/scales) under quant_method {quant.method!r}, "
                     f"bits {bits!r}, group_size {group!r}, checkpoint_format {fmt!r}; "
                     f"vllm-aimer reads quant_method gptq, bits {'/'.join(map(str, BITS))}, "
                     "checkpoint_format gptq or gptq_v2.",
                     "check quantization_config in config.json, or pass a plan file (a plan "
                     "needs no scores).")
    per = 32 // bits
    qweight, scales = proj.tensors["qweight"], proj.tensors["scales"]
    if len(qweight.shape) != 2:
        raise refuse(proj, "qweight must be 2-D.", "use the checkpoint as released.")
    rows, cols = qweight.shape[0] * per, qweight.shape[1]
    g = rows if group == -1 else group
    if tuple(scales.shape) != (ceil_div(rows, g), cols):
        raise refuse(proj, f"{scales.name} has shape {list(scales.shape)}, expected "
                     f"{[ceil_div(rows, g), cols]} for {rows} input rows in groups of {g}.",
                     "check quantization_config.group_size against the checkpoint.")
    symmetric = raw.get("sym", True)
    qzeros = proj.tensors.get("qzeros")
    if not symmetric:
        if qzeros is None:
            raise refuse(proj, "an asymmetric GPTQ checkpoint (sym false) without qzeros.",
                         "use the checkpoint as released.")
    if qzeros is not None and tuple(qzeros.shape) != (scales.shape[0], ceil_div(cols, per)):
        raise refuse(proj, f"{qzeros.name} has shape {list(qzeros.shape)}, expected "
                     f"{[scales.shape[0], ceil_div(cols, per)]}.", "check the checkpoint's tensors.")
    g_idx = proj.tensors.get("g_idx")
    if g_idx is not None and tuple(g_idx.shape) != (rows,):
        raise refuse(proj, f"{g_idx.name} has shape {list(g_idx.shape)}, expected [{rows}].",
                     "check the checkpoint's tensors.")
    offset = None if symmetric else (1 if fmt == "gptq" else 0)
    return GptqScorer(proj, bits, g, offset)


ENCODING = Encoding(
    name="gptq", label="GPTQ (`qweight` + `scales` + `qzeros` [+ `g_idx`], 2/4/8-bit, v1 and "
    "v2 zero points)", suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
