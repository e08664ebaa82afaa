"""AdamW with a linear-warmup then cosine learning-rate schedule (the `optim` group's
OptimConfig, in trainer/config.py, builds them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mm_moe.model.modality_ops import NORMS
from mm_moe.model.moe.layer import MoELayer

if TYPE_CHECKING:  # annotations only: the config's one import path is its config.py
    from mm_moe.trainer.config import OptimConfig


def adamw(
    cfg: OptimConfig, model: torch.nn.Module, exclude=(), router_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW over the parameters not in `exclude`; norm weights (per-modality [M, d] copies
    too) and other 1-D parameters get no weight decay; MoE router weights, with
    `router_lr_scale` != 1, a group of their own at lr x router_lr_scale."""
    skip = {id(p) for p in exclude}
    norms = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    routers = set()
    if router_lr_scale != 1.0:
        routers = {
            id(p)
            for m in model.modules()
            if isinstance(m, MoELayer)
            for p in m.routers.parameters()
        }
    decay, no_decay, router = [], [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        if id(p) in routers:
            router.append(p)
        else:
            (decay if p.dim() >= 2 and id(p) not in norms else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": router, "weight_decay": cfg.weight_decay, "lr": cfg.lr * router_lr_scale},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=cfg.fused or None,
    )


def cosine_schedule(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, max_steps))
