"""AdamW with a linear-warmup then cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mm_moe.errors import UserError
from mm_moe.model.modality_ops import NORMS
from mm_moe.model.moe.layer import MoELayer


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    # The cosine decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    # Steps of the cosine after warmup; 0 decays over the rest of trainer.max_steps.
    decay_steps: int = 0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Global grad-norm clipping; 0 turns it off.
    grad_clip: float = 1.0
    # torch's fused AdamW kernel (CPU and CUDA), one pass over each tensor; false: the
    # per-tensor loop (torch's default on CPU), which took 3.7x as long for the demo's 5.4M
    # parameters on one CPU thread. The two differ only in rounding.
    fused: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise UserError(f"optim.lr={self.lr} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise UserError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise UserError("optim.weight_decay and optim.grad_clip must be >= 0, optim.eps > 0")

    def build(
        self, model: torch.nn.Module, exclude=(), router_lr_scale: float = 1.0
    ) -> torch.optim.Optimizer:
        """AdamW over the parameters not in `exclude`; norm weights (per-modality [M, d]
        copies too) and other 1-D parameters get no weight decay; MoE router weights, with
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
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": router, "weight_decay": self.weight_decay, "lr": self.lr * router_lr_scale},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=self.lr,
            betas=tuple(self.betas),
            eps=self.eps,
            fused=self.fused or None,
        )

    def lr_factor(self, step: int, max_steps: int) -> float:
        """Multiplier of `lr` for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = self.decay_steps or max(1, max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    def build_schedule(self, optimizer, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_factor(step, max_steps)
        )
