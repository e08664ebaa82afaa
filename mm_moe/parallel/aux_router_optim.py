"""The auxiliary routers' own optimizer, outside DeepSpeed's engine and its gradient clip.

The auxiliary routers (expert choice and mixture-of-depths, MoMa 2.4) learn from their own
BCE losses on detached inputs: their gradients touch nothing else, yet inside the engine they
count in the global clip norm (about 40% of the squared norm of a trained demo MoMa), so
the main model's steps were clipped on steps where a dense model's are not. Here they are
trained apart: gradients by `torch.autograd.grad` (never in `.grad`, so the engine neither
reduces nor clips them), averaged over the ranks by one all-reduce, clipped by their own norm
(`optim.grad_clip`), and stepped by an AdamW with the run's hyperparameters and LR schedule.
They stay fp32 under bf16 training (tiny, and their BCE wants the precision).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from mm_moe.model.moe.aux_router import AuxRouter
from mm_moe.parallel.adam_state import ADAM_KEYS, adam_state, group_of

log = logging.getLogger("mm_moe")


def aux_router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every auxiliary-router parameter of `model`, by its name in the model."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: p for m in model.modules() if isinstance(m, AuxRouter) for p in m.parameters()
    }


class AuxRouterOptimizer:
    def __init__(self, model: nn.Module, optim_cfg, max_steps: int):
        self.params = aux_router_parameters(model)
        for module in model.modules():
            if isinstance(module, AuxRouter):
                module.float()
        self.cfg, self.max_steps = optim_cfg, max_steps
        weights = [p for p in self.params.values() if p.dim() >= 2]
        biases = [p for p in self.params.values() if p.dim() < 2]
        groups = [
            {"params": weights, "weight_decay": optim_cfg.weight_decay},
            {"params": biases, "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
            fused=optim_cfg.fused or None,
        )
        self.steps = 0  # optimizer steps taken (the LR schedule's position)
        self._grads: list[torch.Tensor] | None = None
        self._reduced: tuple[torch.Tensor, torch.Tensor] | None = None  # (flat grads, norm)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (a share of the step's objective)."""
        params = list(self.params.values())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        if self._grads is None:
            self._grads = grads
        else:
            torch._foreach_add_(self._grads, grads)

    def reduce(self, world_size: int) -> torch.Tensor | None:
        """Average the accumulated gradients over the ranks (one all-reduce) and return their
        norm as a device scalar, for the step's one copy to the host (trainer/step.py); None
        when nothing was accumulated. Collective; `step` then uses them."""
        if self._grads is None:
            return None
        flat = torch.cat([g.reshape(-1) for g in self._grads])
        if world_size > 1:
            dist.all_reduce(flat)
            flat /= world_size
        self._reduced = (flat, torch.linalg.vector_norm(flat))
        return self._reduced[1]

    def step(self, world_size: int, norm: float | None = None) -> float:
        """Clip the averaged gradients by their own norm and step; returns the norm before
        clipping (NaN when nothing was accumulated). Reduces first (collective) unless `reduce`
        did; `norm` is the host's copy of `reduce`'s norm (else it is copied here)."""
        if self._reduced is None:
            self.reduce(world_size)
        reduced, self._reduced, self._grads = self._reduced, None, None
        if reduced is None:
            return float("nan")
        flat, norm_t = reduced
        norm = float(norm_t) if norm is None else norm
        if not math.isfinite(norm):  # the step guard drops such steps; never apply them
            log.warning("auxiliary routers: non-finite gradient norm, update skipped")
            return norm
        clip = self.cfg.grad_clip
        if clip > 0:
            flat *= torch.clamp(clip / (norm_t + 1e-6), max=1.0)
        offset = 0
        for p in self.params.values():
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        lr = self.cfg.lr * self.cfg.lr_factor(self.steps, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return norm

    def skip(self) -> None:
        """A dropped step: discard the accumulated gradients."""
        self._grads = self._reduced = None

    # ---- checkpoints: moments by parameter name, in the model's optimizer.pt ----
    def moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {exp_avg, exp_avg_sq}} on CPU, every parameter's: zeros for one never
        stepped (moe.aux_router_coef=0 gives them no gradient), as Adam would hold them."""
        out = {}
        for name, p in self.params.items():
            state = self.optimizer.state.get(p)
            if state:
                out[name] = {k: state[k].detach().float().cpu().clone() for k in ADAM_KEYS}
            else:
                out[name] = {k: torch.zeros(p.shape, dtype=torch.float32) for k in ADAM_KEYS}
        return out

    def load_moments(self, moments: dict, step: int) -> None:
        """Restore the moments (missing ones start at zero) and the schedule position."""
        groups = group_of(self.optimizer)
        for name, p in self.params.items():
            # On p's device and dtype, `step` where fused AdamW reads it (adam_state.py).
            self.optimizer.state[p] = adam_state(p, groups[id(p)], step, moments.get(name))
        self.steps = step
