"""How an expert group's routing statistics average over micro-batches and ranks.

Each forward reports a group's statistics as means over that micro-batch's tokens of the group,
and zeros for a group with no tokens there (every rank must report the same keys). An equal
mean over micro-batches would pull a sparse group's figures towards zero (one micro-batch of
four holding images: a mean gate of 0.5 read as 0.125), so a per-token statistic is weighted by
the group's token count (`moe/l<i>/<group>/tokens`, reported on every forward) and divided by
the summed count: the mean over every token of the group in the step. The counts themselves,
and what depends on the weights alone, average plainly.
"""

from __future__ import annotations

COUNTS = ("tokens", "pairs")
WEIGHTS_ONLY = ("router_cosine",)


def tokens_key(name: str) -> str | None:
    """For a per-token statistic of an expert group (`moe/l<i>/<group>/<stat>`), the key of
    the group's token count that weights it; None for anything else."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "moe" or not parts[1].startswith("l"):
        return None
    if parts[3] in COUNTS + WEIGHTS_ONLY:
        return None
    return "/".join([*parts[:3], "tokens"])


def weighted(stats: dict) -> dict:
    """One forward's statistics with each per-token statistic multiplied by its group's token
    count (a number the host knows: no device sync)."""
    out = {}
    for name, value in stats.items():
        key = tokens_key(name)
        out[name] = value if key is None else value * stats[key]
    return out


def means(sums: dict, count: float) -> dict:
    """Statistics summed over forwards (after `weighted`) to their means: per-token ones over
    the group's summed tokens (NaN where it had none), the rest over `count` forwards. Values
    are numbers or lists of numbers (per-expert vectors)."""
    out = {}
    for name, value in sums.items():
        key = tokens_key(name)
        divisor = count if key is None else _first(sums[key])
        if isinstance(value, list):
            out[name] = [v / divisor if divisor else float("nan") for v in value]
        else:
            out[name] = value / divisor if divisor else float("nan")
    return out


def _first(value) -> float:
    return value[0] if isinstance(value, list) else value
