"""MXFP4: gpt-oss's fused blocks (a packer written here) and compressed-tensors' per-expert layout (the `compressed-tensors` package).

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.encodings.mxfp4 import GROUP
from vllm_aimer.testing.encoders.ct_producer import ct_compress, ct_config

__all__ = ["encode_blocks", "encode", "quantization_config", "CT_WEIGHTS"]


_FP4_POSITIVE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def encode_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss layout, packer written here: w [..., cols] (cols a multiple of 32) ->
    (blocks uint8 [..., cols/32, 16], scales uint8 [..., cols/32])."""
    groups = w.to(torch.float32).reshape(*w.shape[:-1], -1, GROUP)
    amax = groups.abs().amax(-1).clamp(min=2.0 ** -120)
    # The smallest power of two that brings the group's largest value within 6.
    exp = torch.ceil(torch.log2(amax / 6.0))
    scaled = groups / torch.exp2(exp)[..., None]
    code = (scaled.abs()[..., None] - torch.tensor(_FP4_POSITIVE)).abs().argmin(-1)
    code = code | ((scaled < 0) & (code > 0)).to(torch.long) << 3
    packed = (code[..., 0::2] | code[..., 1::2] << 4).to(torch.uint8)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()


CT_WEIGHTS = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
              "group_size": GROUP, "dynamic": False}


def encode(w: torch.Tensor, e8m0: bool = False) -> dict[str, torch.Tensor]:
    """Per expert, packed by the `compressed-tensors` package (its MXFP4 compressor);
    e8m0: scales stored as F8_E8M0 instead of uint8 (same bytes)."""
    out = ct_compress(w, CT_WEIGHTS, "mxfp4-pack-quantized")
    if e8m0:
        out["weight_scale"] = out["weight_scale"].view(torch.float8_e8m0fnu)
    return out


def quantization_config(fused: bool = False) -> Mapping[str, Any]:
    """gpt-oss's quant_method mxfp4 (`fused`), else compressed-tensors
    mxfp4-pack-quantized."""
    if fused:
        return {"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}
    return ct_config(CT_WEIGHTS, "mxfp4-pack-quantized",
                     {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
                      "group_size": GROUP, "dynamic": True})
