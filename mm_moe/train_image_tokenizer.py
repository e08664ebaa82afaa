"""Train the VQ image tokenizer: `python -m mm_moe.tokenization.train_image`.

    python -m mm_moe.tokenization.train_image sources=[data/demo/pairs] \
        heldout=[data/demo/heldout] output=tokenizers/demo steps=1500

Reads every image of the shards (preprocessed by the project's policy: RGB, shorter side
resized, centre crop), trains the VQ-VAE, measures PSNR and codebook usage on the held-out
shards, and writes OUTPUT/vq.pt, vq.yaml and metrics.json. Configured with Hydra
(configs/train_image_tokenizer.yaml), validated against `TrainImageConfig`
(mm_moe/tokenization/config.py). The command's name is mm_moe/tokenization/train_image.py,
which runs this entry point.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from mm_moe.cli import hydra_entry
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TrainImageConfig

log = logging.getLogger("mm_moe")
PROG = "mm_moe.tokenization.train_image"


def load_images(
    urls: list[str], resolution: int, limit: int = 0, key: str = "sources"
) -> torch.Tensor:
    """The images of the shards `urls` (the config key `key`), at most `limit` (0: all)."""
    from mm_moe.data.corpus import iter_images
    from mm_moe.tokenization.vq.train import images_to_tensor

    images = []
    for image in iter_images(urls, key):
        images.append(image)
        if limit and len(images) >= limit:
            break
    if not images:
        raise UserError(f"{key}: no decodable images in {urls}")
    return images_to_tensor(images, resolution)


def train(cfg: TrainImageConfig) -> dict:
    from mm_moe.tokenization.artifacts import refuse_to_replace
    from mm_moe.tokenization.vq.tokenizer import CONFIG, METRICS, WEIGHTS, save
    from mm_moe.tokenization.vq.train import evaluate, train_vq

    refuse_to_replace(cfg.output, [WEIGHTS, CONFIG, METRICS], cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_x = load_images(cfg.sources, cfg.vq.resolution, cfg.max_images)
    # Read before training: a bad heldout= found after it would throw the training away.
    heldout_x = load_images(cfg.heldout, cfg.vq.resolution, key="heldout") if cfg.heldout else None
    log.info(
        "training the VQ tokenizer on %d images (%dx%d, %d codes of %dx%d patches)",
        len(train_x),
        cfg.vq.resolution,
        cfg.vq.resolution,
        cfg.vq.codebook_size,
        cfg.vq.downsample,
        cfg.vq.downsample,
    )
    model = train_vq(train_x, cfg.vq, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
    metrics = {"train": evaluate(model, train_x[:2000]), "config": asdict(cfg)}
    if heldout_x is not None:
        metrics["heldout"] = evaluate(model, heldout_x)
    save(model, Path(cfg.output), metrics)
    report = metrics.get("heldout", metrics["train"])
    log.info(
        "VQ tokenizer written to %s: PSNR %.2f dB, codebook usage %.1f%%",
        cfg.output,
        report["psnr_db"],
        100 * report["codebook_usage"],
    )
    return metrics


def _report(cfg: TrainImageConfig) -> None:
    metrics = train(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}))


def main() -> None:
    hydra_entry(PROG, "train_image_tokenizer", TrainImageConfig, _report)


if __name__ == "__main__":
    main()
