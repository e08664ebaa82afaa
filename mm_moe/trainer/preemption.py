"""Preemption: SIGTERM or SIGUSR1 asks for a checkpoint at the next step boundary, then a clean
exit (status 0), so Slurm's requeue (or torchrun's restart) resumes with checkpoint.resume=auto.

The handler only sets a flag; the training loop agrees on it across ranks with one all-reduce
per step, so every rank saves the same step together.
"""

from __future__ import annotations

import logging
import signal

import torch

log = logging.getLogger("mm_moe")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, all_reduce_sum, device: torch.device) -> bool:
        """True on every rank when any rank received a preemption signal."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)

    def restore_defaults(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
