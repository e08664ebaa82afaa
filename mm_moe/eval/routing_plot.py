"""A run's routing at a glance: layer x step heatmaps of the share of each group's tokens that
no expert processed (`moe/l<layer>/<group>/taken_0` in metrics.jsonl), one panel per group."""

from __future__ import annotations

import re
from pathlib import Path

KEY = re.compile(r"^moe/l(\d+)/([^/]+)/taken_0$")


def unprocessed_grid(rows: list[dict]) -> tuple[list[int], dict[str, list[list[float]]]]:
    """(steps, {group: [layer][step index] share}) from metrics rows (NaN where not logged, or
    null: a step without the group's tokens)."""
    found = {(int(m[1]), m[2]) for r in rows for k in r if (m := KEY.match(k))}
    logged = [r for r in rows if any(KEY.match(k) for k in r)]
    steps = [r["step"] for r in logged]
    layers = sorted({layer for layer, _ in found})
    grid = {}
    for group in sorted({g for _, g in found}):
        grid[group] = [
            [_share(r.get(f"moe/l{layer}/{group}/taken_0")) for r in logged] for layer in layers
        ]
    return steps, grid


def unprocessed_heatmap(rows: list[dict], path: Path) -> Path | None:
    """Write the heatmaps to `path` (PNG); None when the run logged no routing health."""
    steps, grid = unprocessed_grid(rows)
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid), figsize=(5 * len(grid), 3.2), squeeze=False)
    for ax, (group, values) in zip(axes[0], grid.items()):
        image = ax.imshow(
            values,
            aspect="auto",
            vmin=0.0,
            vmax=1.0,
            cmap="magma_r",
            interpolation="nearest",
            extent=(steps[0], steps[-1], len(values) - 0.5, -0.5),
        )
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(values)))
        ax.set_title(f"{group}: tokens no expert processed")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="share of tokens")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _share(value) -> float:
    return float("nan") if value is None else float(value)
