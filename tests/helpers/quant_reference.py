"""Dequantization in numpy, one function per format, written from each format's public
recipe (deliberately not using vllm_aimer): the tests score the dequantized matrix
with the AIMER definition and compare the package's packed-value sums against it.

Each function takes the tensors one projection is stored in ({suffix: torch tensor})
and the parameters the test quantized with, and returns the float64 weight matrix
(orientation does not matter to AIMER: the set of entries does).
"""

from __future__ import annotations

import numpy as np
import torch

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def _u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64) & 0xFFFFFFFF


def fields(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `bits`-wide fields of 32-bit words, field i at bit offset bits * i,
    laid out along `axis` (word w, field i -> index w * per + i)."""
    per = 32 // bits
    parts = [(words >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    stacked = np.stack(parts, axis=axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return stacked.reshape(shape)


def repeat_blocks(s: np.ndarray, br: int, bc: int, rows: int, cols: int) -> np.ndarray:
    return np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:rows, :cols]


def plain(t: dict[str, torch.Tensor]) -> np.ndarray:
    return f64(t["weight"])


def fp8_block(t: dict[str, torch.Tensor], block: tuple[int, int]) -> np.ndarray:
    w = f64(t["weight"])
    return w * repeat_blocks(f64(t["weight_scale_inv"]), *block, *w.shape)


def fp8_scaled(t: dict[str, torch.Tensor], strategy: str, block=None, group=None) -> np.ndarray:
    """code x scale; the scale per tensor, per output row, per block or per column group."""
    w = f64(t["weight"])
    s = f64(t["weight_scale"])
    rows, cols = w.shape
    if strategy == "tensor":
        return w * s.reshape(())
    if strategy == "channel":
        return w * s.reshape(rows, 1)
    if strategy == "block":
        return w * repeat_blocks(s, *block, rows, cols)
    return w * repeat_blocks(s, 1, group, rows, cols)


def int8(t: dict[str, torch.Tensor], strategy: str) -> np.ndarray:
    q = f64(t["weight"])
    rows = q.shape[0]
    shape = () if strategy == "tensor" else (rows, 1)
    z = f64(t["weight_zero_point"]).reshape(shape) if "weight_zero_point" in t else 0.0
    return (q - z) * f64(t["weight_scale"]).reshape(shape)


def gptq(t: dict[str, torch.Tensor], bits: int, group: int, symmetric: bool,
         version: int) -> np.ndarray:
    """qweight [K/per, N] packed along K; qzeros [G, N/per] along N; w = s (q - z)."""
    q = fields(_u32(t["qweight"]), bits, axis=0).astype(np.float64)       # [K, N]
    k = q.shape[0]
    g_idx = t["g_idx"].numpy().astype(np.int64) if "g_idx" in t else np.arange(k) // group
    s = f64(t["scales"])
    if symmetric:
        z = np.full(s.shape, 2.0 ** (bits - 1))
    else:
        z = fields(_u32(t["qzeros"]), bits, axis=1).astype(np.float64)[:, :s.shape[1]]
        z = z + (1 if version == 1 else 0)
    return s[g_idx] * (q - z[g_idx])


AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]


def _awq_unpack(words: torch.Tensor) -> np.ndarray:
    nib = fields(_u32(words), 4, axis=1)                                    # nibble order
    rows, cols = nib.shape
    return nib.reshape(rows, cols // 8, 8)[:, :, AWQ_REVERSE].reshape(rows, cols)


def awq(t: dict[str, torch.Tensor], group: int) -> np.ndarray:
    q = _awq_unpack(t["qweight"]).astype(np.float64)                       # [K, N]
    z = _awq_unpack(t["qzeros"]).astype(np.float64)
    g = np.arange(q.shape[0]) // group
    return (q - z[g]) * f64(t["scales"])[g]


def pack_quantized(t: dict[str, torch.Tensor], bits: int, group: int | None) -> np.ndarray:
    rows, cols = (int(v) for v in t["weight_shape"].tolist())
    q = fields(_u32(t["weight_packed"]), bits, axis=1)[:, :cols].astype(np.float64)
    s = f64(t["weight_scale"])
    if "weight_g_idx" in t:
        g = t["weight_g_idx"].numpy().astype(np.int64)
    else:
        g = np.arange(cols) // (group or cols)
    if "weight_zero_point" in t:
        z = fields(_u32(t["weight_zero_point"]), bits, axis=0)[:rows].astype(np.float64)
        v = q - z[:, g]           # both stored with +2^(b-1): the offsets cancel
    else:
        v = q - 2.0 ** (bits - 1)
    return v * s[:, g]


def _fp4(packed: torch.Tensor) -> np.ndarray:
    b = packed.view(torch.uint8).numpy().astype(np.int64)
    v = np.stack([E2M1[b & 0xF], E2M1[b >> 4]], axis=-1)
    return v.reshape(b.shape[0], -1)


def nvfp4(t: dict[str, torch.Tensor]) -> np.ndarray:
    if "weight_scale_2" in t:   # ModelOpt
        v, scale = _fp4(t["weight"]), f64(t["weight_scale"]) * float(f64(t["weight_scale_2"]))
    else:                        # compressed-tensors
        v = _fp4(t["weight_packed"])
        scale = f64(t["weight_scale"]) / float(f64(t["weight_global_scale"]).reshape(-1)[0])
    return v * np.repeat(scale, 16, axis=1)


def mxfp4(t: dict[str, torch.Tensor]) -> np.ndarray:
    v = _fp4(t["weight_packed"])
    e = t["weight_scale"].view(torch.uint8).numpy().astype(np.float64) - 127.0
    return v * np.repeat(np.exp2(e), 32, axis=1)


def aimer(parts: list[np.ndarray]) -> float:
    w = np.concatenate([p.reshape(-1) for p in parts])
    return float(np.mean(np.abs(w)) / np.sqrt(np.mean(w * w)))
