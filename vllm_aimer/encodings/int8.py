"""INT8 weights with scales: compressed-tensors `int-quantized` (W8A8, per channel
or per tensor, symmetric or with `weight_zero_point`): `<proj>.weight` int8 [R, C] +
`weight_scale` (+ `weight_zero_point`, `input_scale`, `input_zero_point`).

Dequantized value = (code - zero point) x scale (compressed-tensors `dequantize`;
vLLM's W8A8 INT8 MoE method takes per-channel symmetric weights)."""

from __future__ import annotations

from vllm_aimer.encodings.base import Encoding, Projection, QuantConfig, ct_scheme, has, only, refuse
from vllm_aimer.encodings.scaled import ScaledScorer, check_scale, ct_strategy

__all__ = ["ENCODING", "SUFFIXES"]

SUFFIXES = frozenset({"weight", "weight_scale", "weight_zero_point", "input_scale",
                      "input_zero_point", "bias"})


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return (not proj.fused and proj.dtype("weight") == "I8" and has(proj, "weight_scale")
            and only(proj, SUFFIXES))


def _scorer(quant: QuantConfig, proj: Projection) -> ScaledScorer:
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
    return ScaledScorer(proj, strategy)


ENCODING = Encoding(
    name="int8", label="INT8 (compressed-tensors int-quantized W8A8: `weight` int8 + "
    "`weight_scale` [+ `weight_zero_point`])",
    suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
