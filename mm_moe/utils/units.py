"""Numbers as a reader wants them at any scale: 870K parameters and 1.371B alike, 5.36 MFLOP
and 2.13 GFLOP, 12.5 MiB and 25.67 GiB (a fixed unit printed tiny configs as 0.000B)."""

from __future__ import annotations


def _scaled(n: float, units: tuple[tuple[float, str], ...], digits: int) -> tuple[str, str]:
    """(mantissa, unit): the largest unit whose rounded mantissa is at least 1 (999,999 is
    1M, not 1000K)."""
    for factor, unit in units:
        text = f"{n / factor:.{digits}g}"
        if abs(float(text)) >= 1:
            return text, unit
    return f"{n:.{digits}g}", ""


def count(n: float) -> str:
    """Parameters and the like: 1.371B, 280M, 870K, 512."""
    text, unit = _scaled(n, ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")), 4)
    return text + unit


def flop(n: float) -> str:
    """2.13 GFLOP, 5.36 MFLOP."""
    prefixes = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
    text, prefix = _scaled(n, prefixes, 3)
    return f"{text} {prefix}FLOP"


def gib(size_gib: float) -> str:
    """A size given in GiB: GiB from 0.1 GiB up, else MiB (KiB below 0.1 MiB)."""
    if abs(size_gib) >= 0.1 or size_gib == 0:
        return f"{size_gib:.2f} GiB"
    mib = size_gib * 1024
    return f"{mib:.2f} MiB" if abs(mib) >= 0.1 else f"{mib * 1024:.2f} KiB"
