"""FP8 with a multiplying scale named `weight_scale`: compressed-tensors
`float-quantized` (per tensor, per channel, per block of `block_structure`, per
group), quant_method `fp8` without blocks (per tensor), ModelOpt FP8 (per tensor,
per channel, 128x128 blocks) and FBGEMM FP8 (per channel): `<proj>.weight` float8
[R, C] + `<proj>.weight_scale` (+ `input_scale`).

Dequantized value = code x scale (compressed-tensors `dequantize`; vLLM's FP8 MoE
methods)."""

from __future__ import annotations

from vllm_aimer.dtypes import FP8_DTYPES
from vllm_aimer.encodings.base import (Encoding, Projection, QuantConfig, ct_scheme, has,
                                       modelopt_algo, only, refuse)
from vllm_aimer.encodings.scaled import ScaledScorer, Strategy, check_scale, ct_strategy

__all__ = ["ENCODING", "SUFFIXES", "strategy_for"]

SUFFIXES = frozenset({"weight", "weight_scale", "input_scale", "bias"})


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return (not proj.fused and proj.dtype("weight") in FP8_DTYPES and has(proj, "weight_scale")
            and only(proj, SUFFIXES))


def strategy_for(quant: QuantConfig, proj: Projection) -> Strategy:
    """How the config says this projection's FP8 scale is laid out.

    Raises:
        AimerError: the config has no 8-bit float scheme we read for this projection
            (compressed-tensors), or its quant_method is not one with `weight_scale`.
    """
    method = quant.method
    if method == "compressed-tensors":
        scheme = ct_scheme(quant, proj.module)
        w = scheme.weights if scheme else {}
        strategy = ct_strategy(w) if scheme else None
        if scheme is None or w.get("type") != "float" or w.get("num_bits") != 8 or strategy is None:
            raise refuse(proj, "float8 weights with `weight_scale`, but the compressed-tensors "
                         f"config has no 8-bit float scheme for {proj.module} we can read "
                         f"(found: {dict(w) if w else 'none'}).",
                         "check quantization_config.config_groups in config.json.")
        return strategy
    if method == "fp8" and not quant.raw.get("weight_block_size"):
        return Strategy("tensor")
    if method == "fbgemm_fp8":
        return Strategy("channel")
    if method is not None and method.startswith("modelopt"):
        algo = modelopt_algo(quant)
        if algo == "FP8":
            return Strategy("tensor")
        if algo == "FP8_PER_CHANNEL_PER_TOKEN":
            return Strategy("channel")
        if algo in ("FP8_PB_WO", "FP8_BLOCK_SCALES"):
            return Strategy("block", block=(128, 128))
    raise refuse(proj, f"float8 weights with `weight_scale` under quant_method {method!r}, "
                 "which vllm-aimer does not read as a per-tensor/channel/block FP8 scale.",
                 "use a compressed-tensors, fp8, fbgemm_fp8 or ModelOpt FP8 checkpoint, or "
                 "pass a plan file (a plan needs no scores).")


def _scorer(quant: QuantConfig, proj: Projection) -> ScaledScorer:
    weight = proj.tensors["weight"]
    if len(weight.shape) != 2:
        raise refuse(proj, f"an FP8 expert weight must be 2-D, got {list(weight.shape)}.",
                     "use the checkpoint as released.")
    strategy = strategy_for(quant, proj)
    check_scale(proj, "weight_scale", strategy, *weight.shape)
    return ScaledScorer(proj, strategy)


ENCODING = Encoding(
    name="fp8-scaled", label="FP8 with `weight_scale` (compressed-tensors float-quantized per "
    "tensor/channel/block/group, fp8 per tensor, ModelOpt FP8, FBGEMM FP8)",
    suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
