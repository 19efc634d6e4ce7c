"""The one byte formatter of the package and the benchmarks (no dependencies)."""

from __future__ import annotations

__all__ = ["GIB", "human_bytes"]

GIB = 1024**3
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float, unit: str | None = None, digits: int = 2) -> str:
    """`n` bytes as text in binary units.

    Args:
        n: a byte count (negative counts keep their sign).
        unit: one of B, KiB, MiB, GiB, TiB to always print in; None picks the largest
            unit below 1024 of it (bytes are printed without decimals).
        digits: decimals of a unit above B.

    Returns:
        e.g. "512 B", "1.50 KiB", or with unit="GiB", digits=3: "0.001 GiB".

    Raises:
        ValueError: `unit` is not one of the units above.
    """
    if unit is not None:
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {', '.join(_UNITS)}, got {unit!r}")
        value = n / 1024 ** _UNITS.index(unit)
        return f"{value:.0f} B" if unit == "B" else f"{value:.{digits}f} {unit}"
    for name in _UNITS:
        if abs(n) < 1024 or name == _UNITS[-1]:
            return f"{n:.0f} {name}" if name == "B" else f"{n:.{digits}f} {name}"
        n /= 1024
    raise AssertionError("unreachable")
