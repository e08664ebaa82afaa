"""The study's figures: held-out loss against training FLOPs per modality, and the share of
tokens no expert processed against the step."""

from __future__ import annotations

import statistics
from pathlib import Path

from mm_moe.eval.study.plan import MODALITIES
from mm_moe.eval.study.summarise import health_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_health(path: Path, run_dirs: dict[str, list[Path]], labels: dict) -> bool:
    """Per modality, the share of tokens no expert processed against the step, per model
    (mean over seeds and layers); False (nothing drawn) when no model logged it."""
    curves = {name: [health_curve(d) for d in dirs] for name, dirs in run_dirs.items()}
    curves = {name: runs for name, runs in curves.items() if all(runs)}
    if not curves:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, m in zip(axes, MODALITIES):
        for name, runs in curves.items():
            n = min(len(c) for c in runs)
            steps = [runs[0][i][0] for i in range(n)]
            share = [statistics.fmean(c[i][1][m] for c in runs) for i in range(n)]
            ax.plot(steps, share, marker="o", markersize=3, label=labels[name])
        ax.set_xlabel("training step")
        ax.set_title(f"{m} tokens processed by no expert")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the group's tokens, mean over layers")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(path: Path, curves: dict, labels: dict, dense_curve: list[dict]) -> None:
    """Held-out loss (inference routing) against cumulative training FLOPs on each
    modality's tokens: the long dense run dashed, each model's mean over seeds."""
    import matplotlib.ticker

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m in zip(axes, MODALITIES):
        xs = [r[f"flops_cumulative_{m}"] for r in dense_curve]
        ax.plot(xs, [r[f"eval/loss_{m}"] for r in dense_curve], "k--", label="dense (long)")
        for name, runs in curves.items():
            n = min(len(c) for c in runs)
            x = [statistics.fmean(c[i][f"flops_cumulative_{m}"] for c in runs) for i in range(n)]
            y = [statistics.fmean(c[i][f"eval/loss_{m}"] for c in runs) for i in range(n)]
            ax.plot(x, y, marker="o", markersize=2, label=labels[name])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels overlapped
        ax.set_xlabel(f"cumulative training FLOPs on {m} tokens")
        ax.set_ylabel(f"held-out {m} loss (inference routing)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
