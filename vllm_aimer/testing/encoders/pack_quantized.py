"""compressed-tensors pack-quantized INT4/INT8 (group, channel, act-order), packed by the `compressed-tensors` package.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.testing.encoders.ct_producer import ct_compress, ct_config

__all__ = ["ct_weights_args", "encode", "quantization_config"]


def ct_weights_args(bits: int = 4, group: int | None = 128, symmetric: bool = True,
                    actorder: str | None = None) -> dict[str, Any]:
    """The scheme's `weights` arguments: `bits`-bit int, per group of `group` (None: per
    channel), symmetric or not, with `actorder` if given."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "group" if group else "channel", "group_size": group,
            "actorder": actorder, "dynamic": False}


def encode(w: torch.Tensor, bits: int = 4, group: int | None = 128, symmetric: bool = True,
           g_idx: torch.Tensor | None = None, scale_dtype: torch.dtype | str | None = "bfloat16"
           ) -> dict[str, torch.Tensor]:
    """Packed by the `compressed-tensors` package (pack_to_int32 and its qparams);
    `scale_dtype` a torch dtype or its name."""
    if isinstance(scale_dtype, str):
        scale_dtype = getattr(torch, scale_dtype)

    args = ct_weights_args(bits, group, symmetric, "group" if g_idx is not None else None)
    return ct_compress(w, args, "pack-quantized", scale_dtype, g_idx)


def quantization_config(bits: int = 4, group: int | None = 128, symmetric: bool = True,
                        actorder: str | None = None) -> Mapping[str, Any]:
    """compressed-tensors pack-quantized config with these weights (weight-only)."""
    return ct_config(ct_weights_args(bits, group, symmetric, actorder), "pack-quantized")
