"""Byte-size parsing and formatting shared by the bench modules.

Sizes on the command line use binary suffixes (64K = 65536, 8G = 8 GiB);
throughput figures are reported in decimal MB/s (10**6 bytes per second),
as restic, borg and zstd print them.
"""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SUFFIX = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str | int) -> int:
    """'8G' -> 8 GiB, '64K' -> 65536, '1.5M' -> 1.5 MiB (binary suffixes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 64K, 256M, 8G)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: float | int | None) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def chunk_label(n: int) -> str:
    """65536 -> '64K', 4194304 -> '4M' (the form the CLI accepts)."""
    for unit, factor in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def mbps(nbytes: float | int | None, seconds: float | None) -> float | None:
    """Decimal MB/s, or None when there is nothing to divide."""
    if nbytes is None or not seconds or seconds <= 0:
        return None
    return nbytes / seconds / 1e6
