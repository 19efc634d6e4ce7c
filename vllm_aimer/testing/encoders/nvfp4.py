"""NVFP4 (compressed-tensors and ModelOpt layouts), packed by the `compressed-tensors` package.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.encodings.nvfp4 import GROUP
from vllm_aimer.testing.encoders.ct_producer import ct_compress, ct_config

__all__ = ["encode", "quantization_config", "CT_WEIGHTS"]


CT_WEIGHTS = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
              "group_size": GROUP, "dynamic": False}


def encode(w: torch.Tensor, flavour: str = "compressed-tensors") -> dict[str, torch.Tensor]:
    """Packed by the `compressed-tensors` package (its NVFP4 compressor). ModelOpt's
    layout is the same bytes and block scales with weight_scale_2 = 1 / global scale
    (the renaming is written here)."""
    out = ct_compress(w, CT_WEIGHTS, "nvfp4-pack-quantized")
    if flavour == "compressed-tensors":
        return out
    return {"weight": out["weight_packed"], "weight_scale": out["weight_scale"],
            "weight_scale_2": (1.0 / out["weight_global_scale"].to(torch.float32)).reshape(())}


def quantization_config(flavour: str = "compressed-tensors") -> Mapping[str, Any]:
    """compressed-tensors nvfp4-pack-quantized, or ModelOpt NVFP4 (`flavour` "modelopt")."""
    if flavour == "modelopt":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": GROUP,
                "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", "*.mlp.gate"]}
    return ct_config(CT_WEIGHTS, "nvfp4-pack-quantized",
                     {"num_bits": 4, "type": "float", "symmetric": True,
                      "strategy": "tensor_group", "group_size": GROUP, "dynamic": "local"})
