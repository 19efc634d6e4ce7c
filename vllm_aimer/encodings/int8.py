"""INT8 weights with scales: compressed-tensors `int-quantized` (W8A8, per channel
or per tensor, symmetric or with `weight_zero_point`): `<proj>.weight` int8 [R, C] +
`weight_scale` (+ `weight_zero_point`, `input_scale`, `input_zero_point`).

Dequantized value = (code - zero point) x scale (compressed-tensors `dequantize`;
vLLM's W8A8 INT8 MoE method takes per-channel symmetric weights)."""

from __future__ import annotations

from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (Encoding, MatrixScorer, Projection, QuantConfig, Sums,
                                       add_block_scaled, ceil_div, ct_scheme, f64, has, only,
                                       refuse, row_spans)
from vllm_aimer.encodings.scaled import Strategy, check_scale, ct_strategy, expand_tile

__all__ = ["ENCODING", "SUFFIXES", "Int8Scorer"]

SUFFIXES = frozenset({"weight", "weight_scale", "weight_zero_point", "input_scale",
                      "input_zero_point", "bias"})


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return (not proj.fused and proj.dtype("weight") == "I8" and has(proj, "weight_scale")
            and only(proj, SUFFIXES))


class Int8Scorer(MatrixScorer):
    """INT8 codes less their zero point (if any), times `weight_scale`, per expert."""

    def __init__(self, proj: Projection, strategy: Strategy) -> None:
        self.weight, self.scale = proj.tensors["weight"], proj.tensors["weight_scale"]
        self.zero = proj.tensors.get("weight_zero_point")
        super().__init__(proj, self.weight, self.scale, *([self.zero] if self.zero else []))
        self.strategy = strategy

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        rows, cols = self.weight.shape
        tile = self.strategy.tile(rows, cols)
        scale = self.strategy.canonical(f64(f.get_tensor(self.scale.name)), rows)
        zero = (self.strategy.canonical(f.get_tensor(self.zero.name).to(torch.float32), rows)
                if self.zero is not None else None)
        sl = f.get_slice(self.weight.name)
        for span in row_spans(rows, cols, chunk_elements, align=tile[0]):
            blocks = slice(span.start // tile[0], ceil_div(span.stop, tile[0]))
            v = sl[span].to(torch.float32)
            if zero is not None:
                v = v - expand_tile(zero[blocks], tile, v.shape[0], cols)
            add_block_scaled(acc, v, scale[blocks], tile)


def _scorer(quant: QuantConfig, proj: Projection) -> Int8Scorer:
    weight = proj.tensors["weight"]
    scheme = ct_scheme(quant, proj.module) if quant.method == "compressed-tensors" else None
    w = scheme.weights if scheme else {}
    strategy = ct_strategy(w) if scheme else None
    if (scheme is None or w.get("type") != "int" or w.get("num_bits") != 8 or strategy is None
            or len(weight.shape) != 2):
        raise refuse(proj, f"int8 weights under quant_method {quant.method!r} with scheme "
                     f"{dict(w) if w else 'none'}; vllm-aimer reads int8 experts as "
                     "compressed-tensors int-quantized (8-bit int, per tensor/channel/group/block).",
                     "use a compressed-tensors W8A8 checkpoint, or pass a plan file (a plan "
                     "needs no scores).")
    check_scale(proj, "weight_scale", strategy, *weight.shape)
    symmetric = w.get("symmetric", True)
    if symmetric == ("weight_zero_point" in proj.tensors):
        raise refuse(proj, f"the scheme says symmetric={symmetric}, but weight_zero_point is "
                     f"{'present' if symmetric else 'absent'}.",
                     "check quantization_config.config_groups in config.json.")
    if "weight_zero_point" in proj.tensors:
        zero = proj.tensors["weight_zero_point"]
        if tuple(zero.shape) not in strategy.scale_shapes(*weight.shape):
            raise refuse(proj, f"{zero.name} has shape {list(zero.shape)}, unlike its scale.",
                         "check the checkpoint's tensors.")
    return Int8Scorer(proj, strategy)


ENCODING = Encoding(
    name="int8", label="INT8 (compressed-tensors int-quantized W8A8: `weight` int8 + "
    "`weight_scale` [+ `weight_zero_point`])",
    suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
