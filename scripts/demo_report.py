"""After `make train`: sample images from caption prompts, caption held-out images, score
zero-shot digit classification by caption likelihood, and print a summary of the run.

    .venv/bin/python scripts/demo_report.py runs/demo [--heldout data/demo/heldout]

Writes RUN_DIR/samples/digits.png (a grid: one column per digit 0-9), the single samples,
and RUN_DIR/samples/captions.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import mm_moe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data_pipelines/, the demo's
from data_pipelines.demo_corpus import WORDS  # noqa: E402
from mm_moe.eval.labelled import labelled_images  # noqa: E402
from mm_moe.eval.routing_plot import unprocessed_heatmap  # noqa: E402
from mm_moe.eval.text_to_image import save_grid  # noqa: E402
from mm_moe.eval.zero_shot import image_prefix, zero_shot_classify  # noqa: E402
from mm_moe.sampling import SampleConfig, generate, split_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--heldout", default="data/demo/heldout")
    parser.add_argument("--per-digit", type=int, default=3)
    parser.add_argument("--zero-shot", type=int, default=200)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    model = mm_moe.load_pretrained(run_dir)
    tok = model.train_config.tokenizer.build()
    vocab, tpi = tok.vocab, tok.image.tokens_per_image
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)

    tiles = []
    for d in range(10):
        prompt = [vocab.bos, *tok.text.encode(f"a handwritten digit {d}"), vocab.boi]
        column = []
        for i in range(args.per_digit):
            new = generate(
                model,
                vocab,
                prompt,
                tpi,
                SampleConfig(tpi + 1, 1.0, 0, seed=i),
                stop_after_image=True,
            )
            codes = [v for k, v in split_output(new, vocab) if k == "image"][0]
            img = tok.image.decode(codes)
            img.save(out / f"digit_{d}_{i}.png")
            column.append(img)
        tiles.append(column)
    save_grid(tiles, out / "digits.png")

    heldout = labelled_images(args.heldout, max(args.zero_shot, 10), "--heldout", 10)
    lines = []
    for i, (image, label) in enumerate(heldout[:10]):
        prompt = image_prefix(tok, image)
        new = generate(model, vocab, prompt, tpi, SampleConfig(16, 0.7, 0, seed=i))
        text = "".join(tok.text.decode(v) for k, v in split_output(new, vocab) if k == "text")
        lines.append(f"held-out {i} (a {WORDS[label]}): {text!r}")
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    digits = [str(d) for d in range(10)]
    accuracy = zero_shot_classify(
        model, tok, heldout[: args.zero_shot], digits, ["a handwritten digit {label}"]
    )["accuracy"]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    routing = unprocessed_heatmap(rows, out / "routing.png")
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]
    print("\n=== mm_moe demo ===")
    print(
        f"steps {last['step']}: loss text {first['loss_text']:.3f} -> {last['loss_text']:.3f}, "
        f"image {first['loss_image']:.3f} -> {last['loss_image']:.3f}; "
        f"{np.mean([r['tokens_per_s'] for r in rows[1:] or rows]):.0f} tokens/s"
    )
    print(
        f"zero-shot digit classification of {len(heldout[: args.zero_shot])} held-out images "
        f"by caption likelihood: {100 * accuracy:.1f}% (chance 10%)"
    )
    print("\n".join(lines[:5]))
    print(f"samples: {out / 'digits.png'} (columns: digits 0-9), {out / 'captions.txt'}")
    if routing is not None:
        print(f"routing: {routing} (per layer and step, the tokens no expert processed)")
    print(
        f"metrics: {run_dir / 'metrics.jsonl'}; wandb (offline): {run_dir / 'wandb'}; "
        f"checkpoints: {run_dir / 'checkpoints'}"
    )
    (out / "report.json").write_text(
        json.dumps({"zero_shot_accuracy": accuracy, "captions": lines}, indent=1)
    )


if __name__ == "__main__":
    main()
