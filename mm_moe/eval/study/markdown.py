"""The study's tables: study.md (the comparison and the routing health) and the CSV files."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from mm_moe.eval.study.plan import MODALITIES


def fmt(s: dict, key: str, digits: int = 3, pct: bool = False) -> str:
    """`mean ± std` of a summary key, '-' where it was not measured."""
    mean, std = s[f"{key}_mean"], s[f"{key}_std"]
    if math.isnan(mean):
        return "-"
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _header(args) -> list[str]:
    given = [
        f"{flag} {' '.join(values)}"
        for flag, values in (
            ("--override (every run):", getattr(args, "override", [])),
            ("--moe-override (runs with experts):", getattr(args, "moe_override", [])),
        )
        if values
    ]
    return [
        f"# MoMa study ({args.scale}, {args.steps} steps, {args.seeds} seeds; long dense run "
        f"{args.dense_steps} steps)",
        "",
        *([f"Runs trained with {'; '.join(given)}.", ""] if given else []),
        "Held-out loss with inference routing (causal auxiliary routers), mean ± std over "
        "seeds; in brackets the loss with training routing. Savings: dense FLOPs to reach the "
        "model's final held-out loss / the model's FLOPs, per modality (>X: below anything "
        "the long dense run reached; <X: the long dense run was already there at its first "
        "evaluation, so a run this short reads only a bound).",
        "",
        "| model | FLOPs/token vs dense (text, image) | step time vs dense | text loss | "
        "image loss | image vs dense (paired) | zero-shot acc | text->image acc | savings text "
        "| savings image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def _model_line(s: dict, dense: dict) -> str:
    rel = [s[f"flops_per_token_{m}"] / dense[f"flops_per_token_{m}"] for m in MODALITIES]
    sav = [f"{s[f'savings_{m}_bound']}{fmt(s, f'savings_{m}', 2)}" for m in MODALITIES]
    return (
        f"| {s['label']} | {rel[0]:.2f}, {rel[1]:.2f} | {s['step_time_vs_dense']:.2f} | "
        f"{fmt(s, 'loss_text')} "
        f"({s['train_routing_loss_text_mean']:.3f}) | {fmt(s, 'loss_image')} "
        f"({s['train_routing_loss_image_mean']:.3f}) | {_gap(s, 'loss_image_vs_dense')} | "
        f"{fmt(s, 'zero_shot_accuracy', pct=True)} | {fmt(s, 't2i_accuracy', pct=True)} | "
        f"{sav[0]} | {sav[1]} |"
    )


def health_table(summary: list[dict]) -> list[str]:
    """Routing health at the end of training, per modality group, mean over layers."""
    moe = [s for s in summary if not math.isnan(s["taken_0_image_mean"])]
    if not moe:
        return []
    lines = [
        "Routing health at the last logged step (mean over layers; docs/model.md#routing-health):",
        "",
        "| model | no expert: text | no expert: image | gate mean: text | gate mean: image "
        "| router cosine: image | selection overlap: image |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in moe:
        stats = ("taken_0_text", "taken_0_image", "gate_mean_text", "gate_mean_image")
        stats += ("router_cosine_image", "jaccard_image")
        lines.append(f"| {s['label']} | " + " | ".join(fmt(s, k, 2) for k in stats) + " |")
    return lines


def _gap(s: dict, key: str) -> str:
    """A paired gap to dense, mean ± std over seeds, in percent."""
    mean, std = s[f"{key}_mean"], s[f"{key}_std"]
    return "-" if math.isnan(mean) else f"{100 * mean:+.1f} ± {100 * std:.1f}%"


def heldout_table(summary: list[dict], sets: list[str]) -> list[str]:
    """Each whole held-out set's loss after training: inference routing, mean ± std over
    seeds, training routing in brackets, and the image loss against dense's."""
    if not sets:
        return []
    dense = next(s for s in summary if s["model"] == "dense")
    tokens = ", ".join(
        f"{name} {dense[f'{name}_tokens_text_mean']:,.0f} text and "
        f"{dense[f'{name}_tokens_image_mean']:,.0f} image tokens"
        for name in sets
    )
    head = " | ".join(f"{name}: text | {name}: image | {name}: image vs dense" for name in sets)
    lines = [
        f"Held-out loss of the final models on each whole held-out set ({tokens}), inference "
        "routing, mean ± std over seeds, training routing in brackets; image vs dense: the "
        "relative difference to dense of the same seed (same batches), mean ± std over seeds:",
        "",
        f"| model | {head} |",
        "|---|" + "---|---|---|" * len(sets),
    ]
    for s in summary:
        cells = []
        for name in sets:
            for m in MODALITIES:
                train = s[f"{name}_train_routing_loss_{m}_mean"]
                cells.append(f"{fmt(s, f'{name}_loss_{m}')} ({train:.3f})")
            cells.append(_gap(s, f"{name}_loss_image_vs_dense"))
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return lines


def _notes(summary: list[dict], args, dense_long: dict, wall_s: float) -> str:
    note = (
        f"Long dense run: final held-out loss text {dense_long['loss_text']:.3f}, image "
        f"{dense_long['loss_image']:.3f}"
    )
    if "min_loss_text" in dense_long:
        note += (
            f" (its lowest: text {dense_long['min_loss_text']:.3f}, image "
            f"{dense_long['min_loss_image']:.3f}); it read {dense_long['documents']:,} "
            "documents, each source this many epochs: "
            + ", ".join(f"{name} {e:.2f}" for name, e in dense_long["epochs"].items())
        )
    note += ". Step time: median of the logged training steps, mean over seeds, relative to dense. "
    if args.multimodal:
        judge = statistics.fmean(s["judge_accuracy_mean"] for s in summary)
        note += (
            f"Zero-shot: {args.zero_shot} held-out digits, chance 10%. Text->image: "
            f"{args.t2i_per_label} images per digit judged by a classifier with "
            f"{100 * judge:.1f}% accuracy on real (VQ-reconstructed) held-out digits. "
        )
    corpus = getattr(args, "corpus", "demo")
    note += f"Data: the {corpus} corpus. Wall time {wall_s / 60:.1f} min."
    return note


def write_markdown(
    path: Path,
    summary: list[dict],
    args,
    dense_long: dict,
    wall_s: float,
    health_plot: bool = False,
    sets: list[str] = (),
) -> None:
    dense = next(s for s in summary if s["model"] == "dense")
    lines = _header(args) + [_model_line(s, dense) for s in summary]
    for block in (heldout_table(summary, sets), health_table(summary)):
        lines += ["", *block] if block else []
    lines.append("")
    lines.append(_notes(summary, args, dense_long, wall_s))
    lines += ["", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    if health_plot:
        lines += ["![tokens no expert processed](routing_health.png)", ""]
    path.write_text("\n".join(lines))


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
