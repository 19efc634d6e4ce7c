"""Sums of |w| and w^2 of plain float values (F32, BF16, F16, F64), in numpy.

One pass over a chunk of stored values writes their float32 magnitudes to a per-thread
buffer that stays in cache (BF16: sign bits cleared on a uint32 view of value pairs,
then each 16-bit value shifted or masked into the top half of a float32 word; F32 by
np.abs); two BLAS dot products
per run of 256 magnitudes give sum |w| (against ones) and sum w^2 (with itself) in
float32, and the runs are added in float64: each sum within ~1e-7 relative of a
float64 sum even when outliers dominate a run (scores within 1e-6, the contract; far
closer on real weights, whose errors average out over millions of runs), at several
GB/s per core. numpy releases the GIL in all of it, so threads scale.

The result depends only on the values and the chunk boundaries, never on the thread
that computes it: scores are identical whatever the number of threads.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["RUN", "STORAGE", "rowdot", "scratch", "float_sums", "storage_view"]

RUN = 256
"""Values per float32 partial sum (BLAS dot products accumulate over several lanes,
so each lane adds a handful of values before the float64 total)."""

STORAGE: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16),  # numpy has no bfloat16
    "F8_E4M3": np.dtype(np.uint8),  # codes (encodings/fp8_block.py decodes them)
}
"""How each safetensors dtype read through memory maps is viewed in numpy."""

_ONES32 = np.ones(RUN, np.float32)
_ONES64 = np.ones(RUN, np.float64)


def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products (BLAS per row; np.vecdot is numpy >= 2)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(a, b)
    return np.einsum("ij,ij->i", a, np.broadcast_to(b, a.shape))


class _Scratch(threading.local):
    """One reusable buffer per thread (grown, never shrunk: bounded by the chunk size)."""

    def __init__(self) -> None:
        self.buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self.buf.nbytes < nbytes:
            self.buf = np.empty(max(nbytes, 1 << 16), np.uint8)
        return self.buf[:nbytes]


scratch = _Scratch()
"""Per-thread scratch memory: `scratch.get(nbytes)` is a uint8 view of `nbytes` bytes,
reused by the next call in the same thread."""


def _magnitude_sums(m: np.ndarray, ones: np.ndarray) -> tuple[float, float]:
    """Sums of m and m^2 for magnitudes m (1-D): per run of RUN in m's dtype, float64
    across runs."""
    n = m.size
    full = n - n % RUN
    a = q = 0.0
    if full:
        rows = m[:full].reshape(-1, RUN)
        a = float(rowdot(rows, ones).sum(dtype=np.float64))
        q = float(rowdot(rows, rows).sum(dtype=np.float64))
    if full < n:
        tail = m[full:].astype(np.float64)
        a += float(tail.sum())
        q += float(tail @ tail)
    return a, q


def _bf16(u: np.ndarray) -> tuple[float, float]:
    a = q = 0.0
    n = u.size
    if n % 2:  # the word view needs pairs: the last value on its own
        v = float((u[-1:].astype(np.uint32) << 16).view(np.float32)[0])
        a, q = abs(v), v * v
        n -= 1
        u = u[:n]
    if not n:
        return a, q
    if u.ctypes.data % 4:  # a uint32 view needs 4-byte alignment (rare: copy)
        u = u.copy()
    words = u.view(np.uint32)  # little-endian: low half = even value, high half = odd
    half = n // 2
    out = scratch.get(4 * n)[: 4 * n].view(np.uint32)
    lo, hi = out[:half], out[half:]
    # One pass over the stored bytes (both sign bits cleared), then two in cache: the
    # even values shifted into the top half of a float32, the odd ones masked in place.
    np.bitwise_and(words, 0x7FFF7FFF, out=hi)
    np.left_shift(hi, 16, out=lo)
    np.bitwise_and(hi, 0xFFFF0000, out=hi)
    a2, q2 = _magnitude_sums(out.view(np.float32), _ONES32)
    return a + a2, q + q2


def float_sums(values: np.ndarray, dtype: str) -> tuple[float, float]:
    """(sum |w|, sum w^2) of a 1-D chunk of stored values of safetensors `dtype` (viewed
    as STORAGE[dtype]); memory used: one buffer of the chunk's float32 size per thread."""
    if values.size == 0:
        return 0.0, 0.0
    if dtype == "BF16":
        return _bf16(values)
    if dtype == "F64":
        out64 = scratch.get(8 * values.size).view(np.float64)
        np.abs(values, out=out64)
        return _magnitude_sums(out64, _ONES64)
    out = scratch.get(4 * values.size).view(np.float32)
    np.abs(values, out=out)  # F16 widens exactly
    return _magnitude_sums(out, _ONES32)


def storage_view(values: object) -> tuple[np.ndarray, str]:
    """A numpy array or torch tensor of floats as (1-D storage view, safetensors dtype).
    Other dtypes (float8, integers) are widened to float32, exactly."""
    if isinstance(values, np.ndarray):
        flat = np.ascontiguousarray(values).reshape(-1)
        kind = {np.float32: "F32", np.float64: "F64", np.float16: "F16"}.get(flat.dtype.type)
        return (flat, kind) if kind else (flat.astype(np.float32), "F32")
    import torch  # a tensor was passed: torch is loaded already

    t = values.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "BF16"
    kind = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16"}.get(t.dtype)
    return (t.numpy(), kind) if kind else (t.to(torch.float32).numpy(), "F32")
