"""compressed-tensors float-quantized FP8 (per tensor, channel, group, block), packed by the `compressed-tensors` package.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.testing.encoders.ct_producer import ct_compress, ct_config

__all__ = ["ct_weights_args", "encode", "quantization_config"]


def ct_weights_args(strategy: str, block: tuple[int, int] | None = None,
                    group: int | None = None) -> dict[str, Any]:
    """The scheme's `weights` arguments: 8-bit float, symmetric, `strategy` with its
    block or group."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
            "block_structure": list(block) if block else None, "group_size": group,
            "dynamic": False}


def encode(w: torch.Tensor, strategy: str = "channel", block: tuple[int, int] | None = None,
           group: int | None = None, scale_dtype: torch.dtype | None = None
           ) -> dict[str, torch.Tensor]:
    """compressed-tensors float-quantized FP8, packed by the `compressed-tensors` package."""
    return ct_compress(w, ct_weights_args(strategy, block, group), "float-quantized",
                       scale_dtype)


def quantization_config(strategy: str = "channel", block: tuple[int, int] | None = None,
                        group: int | None = None) -> Mapping[str, Any]:
    """compressed-tensors float-quantized config: these weights, dynamic per-token FP8
    activations."""
    return ct_config(ct_weights_args(strategy, block, group), "float-quantized",
                     {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                      "dynamic": True})
