"""The one table of safetensors dtypes: element width in bits, and which ones hold
plain floating-point values.

Widths count one element of the header's shape (safetensors counts FP4 and FP6
values, not bytes). A dtype missing here is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vllm_aimer.errors import AimerError

__all__ = ["DTYPE_BITS", "FLOAT_DTYPES", "FP8_DTYPES", "dtype_bits", "tensor_bytes"]

DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "U32": 32, "I32": 32,
    "U64": 64, "I64": 64, "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
"""Every dtype safetensors 0.8 writes."""

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Weights in these dtypes are their own values (no decoding)."""
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
"""float8 codes, decoded by torch exactly and multiplied by their scales."""


def dtype_bits(dtype: str, name: str = "") -> int:
    """Bits of one element of `dtype`.

    Args:
        dtype: a safetensors dtype name, e.g. "BF16".
        name: the tensor's name, quoted in the error.

    Raises:
        AimerError: `dtype` is not in DTYPE_BITS.
    """
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        where = f"tensor {name} has " if name else ""
        raise AimerError(
            f"{where}safetensors dtype {dtype!r}, which vllm-aimer does not know "
            f"(known: {', '.join(DTYPE_BITS)}).",
            "check that the checkpoint is a valid safetensors file, or upgrade vllm-aimer.")
    return bits


def tensor_bytes(dtype: str, shape: Sequence[int], name: str = "") -> int:
    """Bytes a tensor takes on disk (sub-byte dtypes are packed, rounded up).

    Raises:
        AimerError: `dtype` is not in DTYPE_BITS (`name` is quoted).
    """
    numel = 1
    for d in shape:
        numel *= d
    return -(-numel * dtype_bits(dtype, name) // 8)
