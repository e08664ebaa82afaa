"""Training the VQ-VAE on a list of images, and measuring it on held-out ones."""

from __future__ import annotations

import logging
import math

import torch
from PIL import Image

from mm_moe.tokenization.config import VQConfig
from mm_moe.tokenization.vq.model import VQVAE, psnr
from mm_moe.tokenization.vq.tokenizer import image_to_tensor

log = logging.getLogger("mm_moe")


def images_to_tensor(images: list[Image.Image], resolution: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(im, resolution) for im in images])


@torch.no_grad()
def evaluate(model: VQVAE, x_BCHW: torch.Tensor, batch: int = 256) -> dict:
    """PSNR of the reconstructions, and how much of the codebook the images use."""
    model.eval()
    recon, codes = [], []
    for i in range(0, len(x_BCHW), batch):
        c = model.encode(x_BCHW[i : i + batch])
        codes.append(c)
        recon.append(model.decode(c))
    codes_all = torch.cat(codes).flatten()
    counts = torch.bincount(codes_all, minlength=model.cfg.codebook_size).float()
    p = counts / counts.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    return {
        "psnr_db": psnr(torch.cat(recon), x_BCHW),
        "codebook_usage": float((counts > 0).float().mean()),
        "codebook_perplexity": perplexity,
        "images": len(x_BCHW),
    }


def train_vq(
    train_x: torch.Tensor,
    cfg: VQConfig,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 100,
) -> VQVAE:
    """Adam on MSE + commitment, random flips-free batches drawn with a seeded generator."""
    torch.manual_seed(seed)
    model = VQVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train_x), (batch_size,), generator=gen)
        recon, _, loss = model(train_x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.info(
                "vq step %d/%d loss %.4f psnr %.2f dB",
                step,
                steps,
                loss.item(),
                psnr(recon.detach(), train_x[idx]),
            )
    return model.eval()
