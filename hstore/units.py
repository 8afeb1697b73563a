"""Sizes for humans: "512K" <-> 524288 (binary units), and byte counts for display."""
from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str) -> int:
    """"512K", "8M", "1G", "1GiB", "4096" -> bytes (binary units). ValueError when malformed or not positive."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 8M, 1G)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"not a positive whole number of bytes: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """Bytes in the largest exact binary unit: 524288 -> "512K", 1073741824 -> "1G"."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for suffix, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= unit:
            return f"{n / unit:.1f} {suffix}"
    return f"{int(n)} B"
