"""`trainer.activation_checkpointing`: activations recomputed in backward instead of kept,
applied from outside the single-device model, one decoder block at a time (torchtitan's
per-block activation checkpointing).

- `none`: every activation is kept for backward.
- `full`: every decoder block keeps only its input; backward recomputes the block (attention,
  FFN or MoE layer, mixture-of-depths routing). About one more forward per step.
- `selective`: the attention of every block (norm'd input projections, QK-norm, RoPE, the
  kernel) is recomputed; FFN and MoE layers keep their activations, so routing never runs
  twice. Less memory saved than `full`, for less recompute.

How, and why it composes with the rest:
- In place, parameter names unchanged (checkpoints load either way): the module's call is
  routed through `torch.utils.checkpoint` (non-reentrant) by setting the same hook that
  `Module.compile()` sets (`_compiled_call_impl`), around the compiled call where
  trainer.compile compiled the block. So it must run after compile_blocks (parallelize.py).
- Side effects of a forward happen once: a recompute gets a scratch copy of the
  ForwardContext (its aux losses and statistics are dropped: the first forward's are the ones
  in the objective and the logs), and the module's buffers are put back as they were (the
  MoE layer's `load_accum`, which steers the expert biases, is not counted twice).
- RNG state is restored for the recompute (router noise draws the same numbers).
- The auxiliary routers' backward (their own optimizer, aux_router_optim.py) reaches into
  checkpointed blocks; trainer/step.py runs it after the main backward and under the same
  `GraphExecGroup` (`backward_group()`), so each block is recomputed once per micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import GraphExecGroup, checkpoint

from mm_moe.model.context import ForwardContext
from mm_moe.model.mod import MoDBlock

log = logging.getLogger("mm_moe")

Mode = Literal["none", "full", "selective"]


def _scratch(ctx: ForwardContext) -> ForwardContext:
    """A copy of the context whose accumulators a recompute may fill and nobody reads."""
    out = copy.copy(ctx)
    out.aux_losses, out.aux_router_losses, out.stats = {}, {}, {}
    return out


class _Recomputed:
    """`module`'s call through torch.utils.checkpoint; `inner` the call it replaces."""

    def __init__(self, module: nn.Module, inner):
        self.module, self.inner = module, inner

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        first = [True]

        def run(*a):
            if first[0]:
                first[0] = False
                return self.inner(*a, **kwargs)
            return self._recompute(a, kwargs)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

    def _recompute(self, args: tuple, kwargs: dict):
        args = tuple(_scratch(a) if isinstance(a, ForwardContext) else a for a in args)
        buffers = [(b, b._version, b.clone()) for b in self.module.buffers()]
        try:
            return self.inner(*args, **kwargs)
        finally:  # also when checkpoint stops the recompute early
            with torch.no_grad():
                for buf, version, saved in buffers:
                    if buf._version != version:
                        buf.copy_(saved)


def _targets(model: nn.Module, mode: Mode) -> list[nn.Module]:
    blocks = list(model.layers)
    if mode == "full":
        return blocks
    inner = [b.block if isinstance(b, MoDBlock) else b for b in blocks]
    return [b.attn for b in inner]


def apply_activation_checkpointing(model: nn.Module, mode: Mode) -> int:
    """Recompute per `mode` (module docstring); returns how many modules recompute. After
    any torch.compile of the blocks."""
    if mode == "none":
        return 0
    targets = _targets(model, mode)
    for module in targets:
        assert not isinstance(module._compiled_call_impl, _Recomputed), "applied twice"
        inner = module._compiled_call_impl or module._call_impl
        module._compiled_call_impl = _Recomputed(module, inner)
    model.activation_checkpointing = mode
    log.info("trainer.activation_checkpointing=%s: %d modules recomputed", mode, len(targets))
    return len(targets)


def backward_group(model: nn.Module):
    """Context for the backward calls of one micro-batch: checkpointed blocks recompute at
    most once across them (the main objective's, then the auxiliary routers')."""
    uses = getattr(model, "activation_checkpointing", "none") != "none"
    return GraphExecGroup() if uses else contextlib.nullcontext()
