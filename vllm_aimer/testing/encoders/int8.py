"""compressed-tensors int-quantized INT8, packed by the `compressed-tensors` package.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.testing.encoders.ct_producer import ct_compress, ct_config

__all__ = ["ct_weights_args", "encode", "quantization_config"]


def ct_weights_args(strategy: str = "channel", symmetric: bool = True,
                    group: int | None = None) -> dict[str, Any]:
    """The scheme's `weights` arguments: 8-bit int, `strategy`, symmetric or not."""
    return {"num_bits": 8, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group, "dynamic": False}


def encode(w: torch.Tensor, strategy: str = "channel", symmetric: bool = True,
           scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors int-quantized, packed by the `compressed-tensors` package."""
    return ct_compress(w, ct_weights_args(strategy, symmetric), "int-quantized", scale_dtype)


def quantization_config(strategy: str = "channel", symmetric: bool = True) -> Mapping[str, Any]:
    """compressed-tensors int-quantized config: these weights, dynamic per-token INT8
    activations (W8A8)."""
    return ct_config(ct_weights_args(strategy, symmetric), "int-quantized",
                     {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                      "dynamic": True})
