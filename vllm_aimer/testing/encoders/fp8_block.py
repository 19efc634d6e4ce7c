"""Block-FP8 (DeepSeek-V3 style `weight_block_size`): an encoder written here.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.encodings.base import ceil_div
from vllm_aimer.encodings.fp8_block import DEFAULT_BLOCK

__all__ = ["encode", "quantization_config"]


def encode(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, torch.Tensor]:
    """float8_e4m3fn codes of a 2-D weight and float32 scales [ceil(R/br), ceil(C/bc)]
    (block amax / 448): dequantized value = code x its block's scale."""
    br, bc = block
    w = w.to(torch.float32)
    rows, cols = w.shape
    sr, sc = ceil_div(rows, br), ceil_div(cols, bc)
    padded = torch.zeros(sr * br, sc * bc)
    padded[:rows, :cols] = w
    blocks = padded.reshape(sr, br, sc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(sr * br, sc * bc)[:rows, :cols]
    return {"weight": q.to(torch.float8_e4m3fn).contiguous(),
            "weight_scale_inv": scale.contiguous()}


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> Mapping[str, Any]:
    """quant_method fp8 with `weight_block_size` = `block`, as DeepSeek-V3 ships it."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block)}
