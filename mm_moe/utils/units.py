"""Numbers as a reader wants them at any scale: 870K parameters and 1.371B alike, 5.36 MFLOP
and 2.13 GFLOP, 12.5 MiB and 25.67 GiB (a fixed unit printed tiny configs as 0.000B)."""

from __future__ import annotations


def count(n: float) -> str:
    """Parameters and the like: 1.371B, 280M, 870K, 512."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.4g}{suffix}"
    return f"{n:.4g}"


def flop(n: float) -> str:
    """2.13 GFLOP, 5.36 MFLOP."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}FLOP"
    return f"{n:.3g} FLOP"


def gib(size_gib: float) -> str:
    """A size given in GiB: GiB from 0.1 GiB up, else MiB (KiB below 0.1 MiB)."""
    if abs(size_gib) >= 0.1 or size_gib == 0:
        return f"{size_gib:.2f} GiB"
    mib = size_gib * 1024
    return f"{mib:.2f} MiB" if abs(mib) >= 0.1 else f"{mib * 1024:.2f} KiB"
