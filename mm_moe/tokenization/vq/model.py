"""The VQ-VAE: encoder -> EMA vector quantizer -> decoder.

Shape legend: B images, C channels, H W image size, h w latent grid, D code dim, K codebook.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.tokenization.config import GROUP_NORM_GROUPS

if TYPE_CHECKING:  # annotations only: the config's one import path is its config.py
    from mm_moe.tokenization.config import VQConfig


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(GROUP_NORM_GROUPS, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(GROUP_NORM_GROUPS, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.net(x)


def _encoder(cfg: VQConfig) -> nn.Sequential:
    c = cfg.channels
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), ResBlock(c)]
    for _ in range(int(math.log2(cfg.downsample))):
        layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), ResBlock(c)]
    layers += [nn.GroupNorm(GROUP_NORM_GROUPS, c), nn.SiLU(), nn.Conv2d(c, cfg.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: VQConfig) -> nn.Sequential:
    c = cfg.channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, c, 3, padding=1), ResBlock(c)]
    for _ in range(int(math.log2(cfg.downsample))):
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c, c, 3, padding=1),
            ResBlock(c),
        ]
    layers += [nn.GroupNorm(GROUP_NORM_GROUPS, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class EMAQuantizer(nn.Module):
    """Nearest-code quantization; codes follow an exponential moving average of the encoder
    outputs assigned to them, and codes that fall out of use restart at a random encoder
    output (keeps codebook usage high without a codebook loss)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        embed_KD = torch.randn(cfg.codebook_size, cfg.code_dim) * 0.1
        self.register_buffer("embed_KD", embed_KD)
        self.register_buffer("ema_count_K", torch.ones(cfg.codebook_size))
        self.register_buffer("ema_sum_KD", embed_KD.clone())

    def codes(self, z_ND: torch.Tensor) -> torch.Tensor:
        dist_NK = (
            z_ND.pow(2).sum(1, keepdim=True)
            - 2 * z_ND @ self.embed_KD.t()
            + self.embed_KD.pow(2).sum(1)
        )
        return dist_NK.argmin(1)

    @torch.no_grad()
    def _update(self, z_ND: torch.Tensor, codes_N: torch.Tensor) -> None:
        cfg = self.cfg
        onehot_NK = F.one_hot(codes_N, cfg.codebook_size).type_as(z_ND)
        count_K = onehot_NK.sum(0)
        self.ema_count_K.mul_(cfg.ema_decay).add_(count_K, alpha=1 - cfg.ema_decay)
        self.ema_sum_KD.mul_(cfg.ema_decay).add_(onehot_NK.t() @ z_ND, alpha=1 - cfg.ema_decay)
        n = self.ema_count_K.sum()
        smoothed_K = (self.ema_count_K + 1e-5) / (n + cfg.codebook_size * 1e-5) * n
        self.embed_KD.copy_(self.ema_sum_KD / smoothed_K.unsqueeze(1))
        dead_K = self.ema_count_K < cfg.restart_threshold
        if dead_K.any():
            picks = torch.randint(0, z_ND.shape[0], (int(dead_K.sum()),), device=z_ND.device)
            self.embed_KD[dead_K] = z_ND[picks]
            self.ema_sum_KD[dead_K] = z_ND[picks]
            self.ema_count_K[dead_K] = 1.0

    def forward(self, z_BDhw: torch.Tensor):
        B, D, h, w = z_BDhw.shape
        z_ND = z_BDhw.permute(0, 2, 3, 1).reshape(-1, D)
        codes_N = self.codes(z_ND.detach())
        if self.training:
            self._update(z_ND.detach(), codes_N)
        q_ND = self.embed_KD[codes_N]
        commit = F.mse_loss(z_ND, q_ND.detach())
        q_ND = z_ND + (q_ND - z_ND).detach()  # straight-through
        q_BDhw = q_ND.view(B, h, w, D).permute(0, 3, 1, 2)
        return q_BDhw, codes_N.view(B, h * w), commit


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = _encoder(cfg), _decoder(cfg)
        self.quantizer = EMAQuantizer(cfg)

    def forward(self, x_BCHW: torch.Tensor):
        """x in [-1, 1]. Returns the reconstruction, codes and the loss."""
        q, codes, commit = self.quantizer(self.encoder(x_BCHW))
        recon = self.decoder(q)
        loss = F.mse_loss(recon, x_BCHW) + self.cfg.commitment * commit
        return recon, codes, loss

    @torch.no_grad()
    def encode(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """[B, grid*grid] codes, raster order."""
        z = self.encoder(x_BCHW)
        B, D, h, w = z.shape
        return self.quantizer.codes(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h * w)

    @torch.no_grad()
    def decode(self, codes_BT: torch.Tensor) -> torch.Tensor:
        g = self.cfg.grid
        q = self.quantizer.embed_KD[codes_BT].view(codes_BT.shape[0], g, g, -1)
        return self.decoder(q.permute(0, 3, 1, 2)).clamp(-1, 1)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(recon, target).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))
