"""GPTQ (v1 and v2 zero points, act-order): a packer written here, checked against vLLM's `gptq_pack` in the tests.

Writes a tiny checkpoint's expert tensors and its quantization_config as the format's
producers do; used by the tests and benchmarks, never when loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vllm_aimer.encodings.base import ceil_div

__all__ = ["encode", "pack_gptq", "quantization_config"]


def encode(w: torch.Tensor, bits: int = 4, group: int = 128, symmetric: bool = True,
           version: int = 1, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A GPTQ packer written here (min-max codes, no Hessian: the layout, not the
    quality, is what matters). w is [out, in] as in nn.Linear; GPTQ stores [in, out].
    g_idx [in] (act-order) assigns input rows to groups; default k // group."""
    wt = w.to(torch.float32).t().contiguous()          # [K, N]
    rows, cols = wt.shape
    per = 32 // bits
    assert rows % per == 0 and cols % per == 0, "GPTQ packs whole words"
    g = rows if group == -1 else group
    groups = ceil_div(rows, g)
    g_of = g_idx.to(torch.long) if g_idx is not None else torch.arange(rows) // g
    top = (1 << bits) - 1
    lo = torch.stack([wt[g_of == i].amin(0) for i in range(groups)])
    hi = torch.stack([wt[g_of == i].amax(0) for i in range(groups)])
    if symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()).clamp(min=1e-8) / (1 << (bits - 1))
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (hi - lo).clamp(min=1e-8) / top
        # v1 stores zero - 1, so a v1 zero point is at least 1.
        zero = torch.round(-lo / scale).clamp(1 if version == 1 else 0, top)
    scale = scale.to(torch.float16).to(torch.float32)
    q = torch.round(wt / scale[g_of] + zero[g_of]).clamp(0, top).to(torch.int64)
    stored_zero = zero.to(torch.int64) - (1 if version == 1 else 0)
    out = {"qweight": pack_gptq(q, bits, dim=0), "scales": scale.to(torch.float16).contiguous(),
           "qzeros": pack_gptq(stored_zero, bits, dim=1)}
    out["g_idx"] = g_of.to(torch.int32).contiguous()
    return out


def pack_gptq(v: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned fields into int32 words along `dim`, low bits first."""
    per = 32 // bits
    v = v.to(torch.int64)
    if dim == 0:
        v = v.t()
    r, c = v.shape
    words = v.reshape(r, c // per, per)
    packed = torch.zeros(r, c // per, dtype=torch.int64)
    for i in range(per):
        packed |= (words[..., i] & ((1 << bits) - 1)) << (bits * i)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def quantization_config(bits: int = 4, group: int = 128, symmetric: bool = True,
                        version: int = 1, desc_act: bool = False) -> Mapping[str, Any]:
    """quant_method gptq; `version` 1 or 2 sets checkpoint_format gptq or gptq_v2."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": symmetric,
            "desc_act": desc_act, "damp_percent": 0.01, "true_sequential": True,
            "checkpoint_format": "gptq" if version == 1 else "gptq_v2"}
