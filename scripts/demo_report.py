"""After `make train`: what the demo model learned, in both directions, on held-out digits.

    .venv/bin/python scripts/demo_report.py runs/demo [--started EPOCH_SECONDS]

- image -> text: zero-shot digit classification by caption likelihood (the run's
  eval.zero_shot settings, 200 held-out digits), and captions generated for the held-out digits
  (the share that name the right digit and no other);
- text -> image: images generated from "a handwritten digit d", recognised by a judge trained on
  real held-out digits only (its own accuracy reported beside it);
- RUN_DIR/samples/: report.json, digits.png (one labelled column per prompted digit),
  losses.png (training and held-out loss per modality), routing.png (tokens no expert took),
  captions.txt.

`--started` (the Makefile passes the time `make train` started) adds the whole wall time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mm_moe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data_pipelines/, the demo's
from data_pipelines.demo_corpus import WORDS  # noqa: E402
from mm_moe.checkpoint import layout  # noqa: E402
from mm_moe.checkpoint.pretrained import find_step_dir  # noqa: E402
from mm_moe.cli import exits_on_failure  # noqa: E402
from mm_moe.errors import UserError  # noqa: E402
from mm_moe.eval.captioning import caption_accuracy  # noqa: E402
from mm_moe.eval.judge import load_or_train_judge  # noqa: E402
from mm_moe.eval.labelled import labelled_images  # noqa: E402
from mm_moe.eval.routing_plot import unprocessed_heatmap  # noqa: E402
from mm_moe.eval.text_to_image import text_to_image_eval  # noqa: E402
from mm_moe.eval.zero_shot import zero_shot_classify  # noqa: E402

KEYS = ("zero_shot_accuracy", "text_to_image_accuracy", "caption_accuracy", "judge_accuracy")


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument(
        "--heldout", default="", help="labelled shards (default: the run's eval.sources)"
    )
    p.add_argument("--zero-shot", type=int, default=200, help="held-out digits classified")
    p.add_argument("--captions", type=int, default=200, help="held-out digits captioned")
    p.add_argument("--per-digit", type=int, default=10, help="images generated per digit")
    p.add_argument("--grid", type=int, default=3, help="of them, rows in digits.png")
    p.add_argument(
        "--guidance", type=float, default=0.0, help="text->image guidance (default: the run's)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="text->image temperature (the run's)"
    )
    p.add_argument(
        "--rerank", type=int, default=0, help="text->image best of N (default: the run's)"
    )
    p.add_argument("--started", type=float, default=0.0, help="epoch seconds make train began")
    p.add_argument(
        "--every-checkpoint",
        action="store_true",
        help="also evaluate each saved checkpoint: samples/steps.json and a markdown table",
    )
    return p.parse_args()


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, m in zip(axes, ("text", "image")):
        train = [(r["step"], r[f"loss_{m}"]) for r in rows if f"loss_{m}" in r]
        held = [(r["step"], r[f"eval/loss_{m}"]) for r in rows if f"eval/loss_{m}" in r]
        ax.plot(*zip(*train), label="training", alpha=0.7)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out", markersize=3)
        ax.set_title(f"{m} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _judge_beside(tok, cfg, args, classes: int):
    """Trains and caches the judge (beside the run's folder, unless the run's
    eval.text_to_image.cache_dir says where) in a forked process, on the other core, while
    this one runs the model's image->text evaluations. Returns a function that waits for it
    and loads it (or trains it here, should the process have failed)."""
    t2i = cfg.eval.text_to_image
    cache = t2i.judge_cache(args.run_dir)
    judge_args = (tok, cfg.tokenizer, args.heldout, classes, t2i.classifier_steps, cache)

    def train_and_cache() -> None:
        torch.set_num_threads(1)
        load_or_train_judge(*judge_args)

    process = multiprocessing.get_context("fork").Process(target=train_and_cache, daemon=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    process.start()

    def wait():
        process.join()
        torch.set_num_threads(threads)
        return load_or_train_judge(*judge_args)

    return wait


def _evaluate(model, tok, cfg, heldout, args, out: Path | None) -> dict:
    """Image->text (zero-shot, captions) and, where the image tokenizer decodes (Chameleon's
    does not: its decoder was never published), text->image judged by a classifier."""
    zs = cfg.eval.zero_shot
    digits = zs.labels
    decodes = getattr(tok.image, "can_decode", True)
    wait_for_judge = _judge_beside(tok, cfg, args, len(digits)) if decodes else None
    zero_shot = zero_shot_classify(
        model, tok, heldout[: args.zero_shot], digits, zs.templates, zs.batch_images
    )
    names = [[d, WORDS[int(d)]] if d.isdigit() and int(d) < 10 else [d] for d in digits]
    captions = caption_accuracy(model, tok, heldout[: args.captions], names)
    report = {
        "zero_shot_accuracy": zero_shot["accuracy"],
        "caption_accuracy": captions["accuracy"],
        "captions": captions["captions"],
        "caption_correct": captions["correct"],
        "num_heldout": {
            "zero_shot": zero_shot["num_images"],
            "captions": len(captions["captions"]),
        },
        **dict.fromkeys(KEYS[1::2] + ("text_to_image_accuracy_single",)),  # not scored
    }
    if wait_for_judge is None:
        return report
    return {**report, **_text_to_image(model, tok, cfg, args, out, wait_for_judge)}


def _text_to_image(model, tok, cfg, args, out: Path | None, wait_for_judge) -> dict:
    zs, t2i = cfg.eval.zero_shot, cfg.eval.text_to_image
    digits = zs.labels
    judge, judge_acc = wait_for_judge()
    guidance = args.guidance or t2i.guidance
    temperature = args.temperature or t2i.temperature
    rerank = args.rerank or t2i.rerank
    generated = text_to_image_eval(
        model,
        tok,
        judge,
        digits,
        zs.templates[0],
        args.per_digit,
        temperature,
        t2i.top_k,
        grid_path=out / "digits.png" if out is not None else None,
        grid_samples=args.grid,
        guidance=guidance,
        rerank=rerank,
    )
    return {
        "text_to_image_accuracy": generated["accuracy"],
        "text_to_image_sampling": {
            "guidance": guidance,
            "temperature": temperature,
            "rerank": rerank,
        },
        # The first candidate of each caption alone (plain sampling, no reranking).
        "text_to_image_accuracy_single": generated["accuracy_single"],
        "judge_accuracy": judge_acc,
    }


def _metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows (none, with a warning, where the folder has none: a copied
    checkpoint)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        print(
            f"WARNING: no {path}: the losses, the routing plot and the throughput are left out "
            "(give the run's folder, where training wrote metrics.jsonl)",
            file=sys.stderr,
        )
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _heldout_loss(rows: list[dict], step: int) -> dict:
    """The last held-out loss per modality at or before the checkpoint's `step`, and its step."""
    held = [r for r in rows if "eval/loss_text" in r and r.get("step", 0) <= step]
    if not held:
        return {}
    last = held[-1]
    return {"step": last["step"], **{m: last[f"eval/loss_{m}"] for m in ("text", "image")}}


def _heldout_text(held: dict) -> str:
    """`; held-out loss at step N: text x, image y`, each modality the held-out set had (one
    without images has no image loss: eval/loss_image is null)."""
    losses = [f"{m} {held[m]:.3f}" for m in ("text", "image") if held.get(m) is not None]
    return f"; held-out loss at step {held['step']}: {', '.join(losses)}" if losses else ""


def main() -> None:
    args = _args()
    run_dir = Path(args.run_dir)
    model = mm_moe.load_pretrained(run_dir)
    cfg = model.train_config
    step = int(layout.read_meta(find_step_dir(run_dir)).get("step", 0))
    rows = _metrics(run_dir)  # read before the evaluations, which take minutes
    tok = cfg.tokenizer.build()
    if not args.heldout:
        if not cfg.eval.zero_shot.urls and not cfg.eval.sources:
            raise UserError(
                f"{run_dir}: the run has no held-out labelled shards (eval.sources); give "
                "--heldout with shards whose samples hold an image and a `cls` member"
            )
        args.heldout = cfg.eval.labelled_urls()
    heldout = labelled_images(
        args.heldout,
        max(args.zero_shot, args.captions),
        "--heldout",
        len(cfg.eval.zero_shot.labels),
    )
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    report = _evaluate(model, tok, cfg, heldout, args, out)

    routing = None
    if rows:
        plot_losses(rows, out / "losses.png")
        routing = unprocessed_heatmap(rows, out / "routing.png")
    steps = [r for r in rows if "loss" in r]
    report.update(
        steps=step,
        tokens_per_s=float(np.mean([r["tokens_per_s"] for r in steps[1:] or steps]))
        if steps
        else None,
        heldout_loss=_heldout_loss(rows, step),
        wall_s=time.time() - args.started if args.started else None,
    )
    lines = [
        f"held-out {i} (a {WORDS[label]}): {caption!r}{'' if ok else '  [wrong]'}"
        for i, ((_, label), caption, ok) in enumerate(
            zip(heldout, report["captions"], report["caption_correct"])
        )
    ]
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _print(report, lines, out, run_dir, routing)
    if args.every_checkpoint:
        _steps_table(run_dir, tok, cfg, heldout, args, out)


def _steps_table(run_dir: Path, tok, cfg, heldout, args, out: Path) -> None:
    """The same figures at every saved checkpoint: how they grow with training."""
    root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    rows = []
    for step in layout.complete_steps(root):
        model = mm_moe.load_pretrained(root / layout.step_dir_name(step))
        r = _evaluate(model, tok, cfg, heldout, args, None)
        rows.append({"step": step, **{k: r[k] for k in KEYS}})
    (out / "steps.json").write_text(json.dumps(rows, indent=1))
    print("\n| step | zero-shot | text -> image | captions |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | " + " | ".join(_percent(r[k]) for k in KEYS[:3]) + " |")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _print(report: dict, lines: list[str], out: Path, run_dir: Path, routing) -> None:
    n = report["num_heldout"]
    print("\n=== mm_moe demo ===")
    speed = f", {report['tokens_per_s']:.0f} tokens/s" if report["tokens_per_s"] else ""
    loss = _heldout_text(report["heldout_loss"])
    print(f"{report['steps']} steps{speed}{loss}")
    print(
        f"image -> text: zero-shot digit classification {100 * report['zero_shot_accuracy']:.1f}% "
        f"of {n['zero_shot']} held-out digits (chance 10%); captions naming the right digit "
        f"{100 * report['caption_accuracy']:.1f}% of {n['captions']}"
    )
    if report["text_to_image_accuracy"] is None:
        print(
            "text -> image: not scored (the image tokenizer has no decoder to show the judge "
            "the generated images: Chameleon's was never published)"
        )
    else:
        _print_text_to_image(report)
    print("\n".join(lines[:5]))
    if report["wall_s"]:
        print(f"make train: {report['wall_s'] / 60:.1f} min wall")
    losses = f", {out / 'losses.png'}" if report["tokens_per_s"] is not None else ""
    print(f"samples: {out / 'digits.png'} (labelled columns: digits 0-9){losses}")
    if routing is not None:
        print(f"routing: {routing} (per layer and step, the tokens no expert processed)")
    print(f"report: {out / 'report.json'}")


def _print_text_to_image(report: dict) -> None:
    rerank = report["text_to_image_sampling"]["rerank"]
    print(
        f"text -> image: {100 * report['text_to_image_accuracy']:.1f}% of generated digits "
        f"recognised as the prompted one (the judge: {100 * report['judge_accuracy']:.1f}% on "
        "real held-out digits)"
        + (
            f"; each the best of {rerank} by the model's own caption likelihood "
            f"({100 * report['text_to_image_accuracy_single']:.1f}% for single samples)"
            if rerank > 1
            else ""
        )
    )


if __name__ == "__main__":
    with exits_on_failure("demo_report"):  # a user's mistake: its message, exit 2
        main()
