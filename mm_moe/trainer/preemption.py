"""Preemption: SIGTERM, SIGUSR1 or SIGUSR2 asks for a checkpoint at the next step boundary,
then a clean exit (status 0), so Slurm's requeue (or torchrun's restart) resumes with
checkpoint.resume=auto.

The handler only sets a flag; the training loop agrees on it across ranks with one all-reduce
per step, so every rank saves the same step together.

A launcher may have its own handler for one of these signals: submitit (Hydra's Slurm
launcher) requeues the job on SIGUSR2. Such a handler is put back when training ends and, once
the run has saved and shut down, called with the signal that stopped it (`pass_on`).
"""

from __future__ import annotations

import logging
import signal

import torch

log = logging.getLogger("mm_moe")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# (the launcher's handler, the signal) that stopped the run, for `pass_on`.
_pending: list[tuple] = []


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal_name, self._signum = signal.Signals(signum).name, signum

    def agreed(self, all_reduce_sum, device: torch.device) -> bool:
        """True on every rank when any rank received a preemption signal."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)

    def restore(self) -> None:
        """The handlers from before training; a launcher's handler of the signal received is
        kept for `pass_on`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        previous = self._previous.get(self._signum)
        if callable(previous):
            _pending[:] = [(previous, self._signum)]


def pass_on() -> None:
    """Call the launcher's own handler of the signal that stopped training (submitit's
    SIGUSR2 requeues the job and exits), now that the checkpoint is written."""
    if _pending:
        handler, signum = _pending.pop()
        log.info("passing %s on to the launcher's handler", signal.Signals(signum).name)
        handler(signum, None)
