"""A run's routing at a glance: layer x step heatmaps of the share of each group's tokens that
no expert processed (`moe/l<layer>/<group>/taken_0` in metrics.jsonl), one panel per group."""

from __future__ import annotations

import re
from pathlib import Path

KEY = re.compile(r"^moe/l(\d+)/([^/]+)/taken_0$")


def unprocessed_grid(
    rows: list[dict],
) -> tuple[list[int], list[int], dict[str, list[list[float]]]]:
    """(steps, MoE layer indices, {group: [layer][step index] share}) from metrics rows (NaN
    where not logged, or null: a step without the group's tokens)."""
    found = {(int(m[1]), m[2]) for r in rows for k in r if (m := KEY.match(k))}
    logged = [r for r in rows if any(KEY.match(k) for k in r)]
    steps = [r["step"] for r in logged]
    layers = sorted({layer for layer, _ in found})
    grid = {}
    for group in sorted({g for _, g in found}):
        grid[group] = [
            [_share(r.get(f"moe/l{layer}/{group}/taken_0")) for r in logged] for layer in layers
        ]
    return steps, layers, grid


def unprocessed_heatmap(rows: list[dict], path: Path) -> Path | None:
    """Write the heatmaps to `path` (PNG); None when the run logged no routing health."""
    steps, layers, grid = unprocessed_grid(rows)
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid), figsize=(5 * len(grid), 3.2), squeeze=False)
    for ax, (group, values) in zip(axes[0], grid.items()):
        # Cells span each logged step's own interval (steps may be irregular: a last step off
        # the log interval), rows the MoE layers by their index in the model.
        image = ax.pcolormesh(
            _edges(steps),
            [i - 0.5 for i in range(len(layers) + 1)],
            values,
            vmin=0.0,
            vmax=1.0,
            cmap="magma_r",
        )
        ax.invert_yaxis()
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_title(f"{group}: tokens no expert processed")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="share of tokens")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _edges(steps: list[int]) -> list[float]:
    """Cell edges around each step: halfway to its neighbours (a lone step spans one)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    middles = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [2 * steps[0] - middles[0], *middles, 2 * steps[-1] - middles[-1]]


def _share(value) -> float:
    return float("nan") if value is None else float(value)
