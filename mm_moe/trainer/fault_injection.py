"""Test-only fault injection, wrapped around a built run from outside: nothing here runs, and
no training code checks for it, unless MM_MOE_FAULT_INJECT is set (its grammar:
mm_moe/utils/faults.py).

- the loader: `drop_batch` discards batches before a step's own (reference runs);
- the engine's model, by forward hooks on the first forward of a step: `kill` and `hang` stop
  the process, `nan` and `spike` scale the logits by NaN or by `scale` (a non-finite or a
  spiking loss, and gradients to match);
- the checkpointer's file writer: `write_error` fails the write of a step with ENOSPC.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from mm_moe.utils.faults import ENV, FaultInjector

log = logging.getLogger("mm_moe")


class FaultyLoader:
    """The loader, with `drop_batch` faults; counts the steps it serves."""

    def __init__(self, loader, injector: FaultInjector, start_step: int):
        self.loader, self.injector = loader, injector
        self.step = start_step
        self.first_forward = False  # the next forward is the step's first

    def next(self):
        self.step += 1
        for _ in range(self.injector.batches_to_drop(self.step)):
            self.loader.next()
        self.first_forward = True
        return self.loader.next()

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _model_hooks(module, loader: FaultyLoader, injector: FaultInjector, rank: int) -> None:
    def before(mod, args):
        if loader.first_forward:
            injector.maybe_kill(loader.step, rank)
            injector.maybe_hang(loader.step, rank)

    def after(mod, args, out):
        if not loader.first_forward:
            return out
        loader.first_forward = False
        factor = injector.loss_factor(loader.step, rank)
        if factor != 1.0:  # the output layer is linear: scaling its input scales the logits
            if out.logits is not None:
                out.logits = out.logits * factor
            else:
                out.hidden = out.hidden * factor
        return out

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def _failing_writes(save_file, injector: FaultInjector):
    def save(obj, path: Path) -> None:
        step = int(path.parent.name.rsplit("_", 1)[1])  # .tmp-step_00000006/model.pt
        if injector.write_fails(step):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
        save_file(obj, path)

    return save


def install(training) -> None:
    """Wrap the parts of a `Training` that MM_MOE_FAULT_INJECT's faults act on."""
    injector = FaultInjector.from_env()
    if not injector.faults:
        return
    log.warning("%s: test faults installed: %s", ENV, injector.faults)
    loader = FaultyLoader(training.loader, injector, training.start_step)
    training.loader = loader
    _model_hooks(training.engine.module, loader, injector, training.dist.rank)
    training.checkpointer.save_file = _failing_writes(training.checkpointer.save_file, injector)
