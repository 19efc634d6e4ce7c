"""AutoAWQ GEMM: a packer written here, checked against vLLM's `awq_pack` in the tests.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.encodings.awq import PACK_ORDER
from vllm_aimer.encodings.base import ceil_div

__all__ = ["encode", "pack_awq", "quantization_config"]


def encode(w: torch.Tensor, group: int = 128) -> dict[str, torch.Tensor]:
    """An AutoAWQ GEMM packer written here (min-max asymmetric codes; AutoAWQ's own
    `pack` layout). w is [out, in]; AWQ stores [in, out]."""
    wt = w.to(torch.float32).t().contiguous()          # [K, N]
    rows, cols = wt.shape
    g = rows if group == -1 else group
    groups = ceil_div(rows, g)
    grouped = torch.nn.functional.pad(wt, (0, 0, 0, groups * g - rows)).view(groups, g, cols)
    lo, hi = grouped.amin(1), grouped.amax(1)
    scale = ((hi - lo).clamp(min=1e-8) / 15).to(torch.float16).to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, 15)
    g_of = torch.arange(rows) // g
    q = torch.round(wt / scale[g_of] + zero[g_of]).clamp(0, 15).to(torch.int64)
    return {"qweight": pack_awq(q), "qzeros": pack_awq(zero.to(torch.int64)),
            "scales": scale.to(torch.float16).contiguous()}


def pack_awq(v: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, N] -> int32 [rows, N/8], columns in AutoAWQ's pack order."""
    rows, cols = v.shape
    words = v.view(rows, cols // 8, 8)[:, :, list(PACK_ORDER)]
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        packed |= (words[..., i] & 0xF) << (4 * i)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32).contiguous()


def quantization_config(group: int = 128) -> Mapping[str, Any]:
    """AutoAWQ's config.json `quantization_config` (4-bit GEMM, zero points)."""
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}
