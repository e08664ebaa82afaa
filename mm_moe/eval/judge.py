"""The judge of generated images: a small classifier trained on real labelled images.

It sees images the way generated ones look: encoded and decoded by the run's image tokenizer
(the VQ reconstruction), as RGB pixels in [0, 1]. A one-hidden-layer MLP with random shifts of
up to 2 pixels, trained on 80% of the labelled images; its accuracy on the other 20% is
reported with every text->image result, so a weak judge is visible. Cached on disk, keyed by
the shards, the tokenizer and the settings.

Shape legend: N images, P pixels x channels, C classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mm_moe.tokenization.interface import decode_images, encode_images


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] floats in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def reconstruct(tok, images: list[Image.Image]) -> list[Image.Image]:
    """The images as the image tokenizer gives them back (encode, then decode)."""
    return decode_images(tok.image, encode_images(tok.image, images))


class Judge(nn.Module):
    def __init__(self, num_pixels: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(num_pixels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_NCHW)

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[int]:
        return self(_pixels(images)).argmax(1).tolist()


def _shift(x_NCHW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x_NCHW, shifts=(dy, dx), dims=(2, 3))


def train_judge(
    x_NCHW: torch.Tensor, y_N: torch.Tensor, num_classes: int, steps: int, seed: int = 0
) -> tuple[Judge, float]:
    """Train on 80%, return the judge and its accuracy on the held-back 20%."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_N), generator=gen)
    n_val = max(1, len(y_N) // 5)
    val, train = order[:n_val], order[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(x_NCHW[0].numel(), num_classes)
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(judge(_shift(x_NCHW[train], gen)), y_N[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((judge(x_NCHW[val]).argmax(1) == y_N[val]).float().mean())
    return judge.eval(), acc


def _cache_key(urls, tokenizer_cfg, num_classes: int, steps: int) -> str:
    from mm_moe.config.validate import to_dict
    from mm_moe.data.shards import expand_urls

    shards = expand_urls(urls, "eval.text_to_image.classifier_urls")
    files = [(s, os.path.getsize(s), os.path.getmtime(s)) for s in shards if os.path.isfile(s)]
    tok = to_dict(tokenizer_cfg)
    tok_files = []
    if tok.get("path") and os.path.isdir(tok["path"]):
        tok_files = sorted(
            (p.name, p.stat().st_mtime) for p in Path(tok["path"]).iterdir() if p.is_file()
        )
    what = [shards, files, tok, tok_files, num_classes, steps, 1]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def load_or_train_judge(
    tok, tokenizer_cfg, urls, num_classes: int, steps: int, cache_dir: str, limit: int = 100_000
) -> tuple[Judge, float]:
    from mm_moe.eval.labelled import labelled_images

    key = _cache_key(urls, tokenizer_cfg, num_classes, steps)
    path = Path(cache_dir) / f"judge_{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        judge = Judge(int(saved["num_pixels"]), num_classes)
        judge.load_state_dict(saved["state"])
        return judge.eval(), float(saved["val_accuracy"])
    pairs = labelled_images(urls, limit, "eval.text_to_image.classifier_urls", num_classes)
    x = _pixels(reconstruct(tok, [im for im, _ in pairs]))
    y = torch.tensor([label for _, label in pairs])
    judge, acc = train_judge(x, y, num_classes, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": judge.state_dict(), "num_pixels": x[0].numel(), "val_accuracy": acc}, tmp)
    os.replace(tmp, path)
    return judge, acc
