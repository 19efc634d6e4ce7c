"""Test-side producer for compressed-tensors formats: the `compressed-tensors` package
(the format's own code, a vLLM dependency) quantizes and packs one weight, so tiny
checkpoints carry the bytes llm-compressor would write. Not used when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["ct_compress", "ct_config"]


def _min_max(w: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed range in the shape compressed-tensors keeps scales in."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        g = args.group_size
        cols = -(-w.shape[1] // g) * g
        padded = torch.nn.functional.pad(w, (0, cols - w.shape[1]))
        v = padded.unflatten(-1, (cols // g, g))
        return v.amin(-1), v.amax(-1)
    if strategy == "block":
        br, bc = args.block_structure
        rows, cols = -(-w.shape[0] // br) * br, -(-w.shape[1] // bc) * bc
        padded = torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))
        v = padded.reshape(rows // br, br, cols // bc, bc)
        return v.amin((1, 3)), v.amax((1, 3))
    raise ValueError(f"strategy {strategy!r} not supported by the test producer")


def ct_compress(w: torch.Tensor, weights: Mapping[str, Any], fmt: str,
                scale_dtype: torch.dtype | None = None,
                g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors' own qparams (`calculate_qparams`, NVFP4's `generate_gparam`)
    and compressor for format `fmt`; scales optionally cast to `scale_dtype` (releases
    keep them in the model's dtype)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = w.to(torch.float32)
    state: dict[str, torch.Tensor] = {"weight": w}
    global_scale = None
    if fmt == "nvfp4-pack-quantized":
        global_scale = generate_gparam(w.min(), w.max())
        state["weight_global_scale"] = global_scale
    if g_idx is not None:
        # Act-order: the scale of column c is the one of group g_idx[c]; observe each
        # group's columns together.
        groups = int(g_idx.max()) + 1
        lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(groups)], 1)
        hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(groups)], 1)
        state["weight_g_idx"] = g_idx.to(torch.int32)
    else:
        lo, hi = _min_max(w, args)
    scale, zero = calculate_qparams(lo, hi, args, global_scale=global_scale)
    if scale_dtype is not None and fmt not in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        scale = scale.to(scale_dtype).to(torch.float32)  # quantize with the stored scale
    state["weight_scale"] = scale
    if not args.symmetric:
        state["weight_zero_point"] = zero
    out = dict(BaseCompressor.load_from_registry(fmt).compress(state, scheme))
    if scale_dtype is not None and fmt not in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        out["weight_scale"] = out["weight_scale"].to(scale_dtype)
    return {k: v.contiguous() for k, v in out.items()}


def ct_config(weights: Mapping[str, Any], fmt: str,
              input_activations: Mapping[str, Any] | None = None,
              targets: tuple[str, ...] = ("Linear",)) -> dict[str, Any]:
    """A compressed-tensors `quantization_config` with one scheme, as llm-compressor writes."""
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": list(targets), "weights": dict(weights),
                                          "input_activations": input_activations,
                                          "format": fmt}},
            "ignore": ["lm_head", "re:.*mlp.gate$"]}
