"""Sizes in human units, as every program of ours prints them (no Flask, click or docker here)."""

from __future__ import annotations


def human_bytes(n: float | int | None) -> str:
    """Decimal units, as ``docker images`` shows sizes: "12.3 MB"; None: "?"."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
