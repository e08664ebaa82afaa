"""Saving checkpoints during training: synchronous or asynchronous, and what a failed write does.

`checkpoint.async=true`: training blocks only while the state is copied to CPU memory
(`state.stage`, collective); a background thread on rank 0 writes it (torch.save, fsync, rename,
`latest`, pruning: `state.write`). The next save, a rollback and the end of the run (also a
preemption exit) wait for it first.

A failed write (full disk, I/O error) leaves the previous checkpoint as it was (the step is
written under a temporary name, removed on error). All ranks learn of it through one
all-reduce (which also stands for the barrier a synchronous save ends with); then
`checkpoint.on_write_error=stop` raises `CheckpointWriteError` on every rank, `continue` logs it,
counts it in `checkpoint/write_errors` and goes on. An asynchronous write's error surfaces at the
next save or at the end of the run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from mm_moe.checkpoint import layout, state
from mm_moe.checkpoint.config import CheckpointConfig
from mm_moe.parallel.distributed import all_reduce_sum

log = logging.getLogger("mm_moe")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (checkpoint.on_write_error=stop); every rank raises it."""

    brief = True  # the message says it all: no traceback
    agreed = True


class Checkpointer:
    """Saves `TrainState`s into `checkpoint.dir`, synchronously or in a background thread.
    `save_file(obj, path)` writes one file (a test may replace it to fail on purpose)."""

    def __init__(self, cfg: CheckpointConfig, device: torch.device):
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.device = device
        self.save_file = state.save_file
        self.write_errors = 0
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, Path, BaseException] | None = None  # rank 0's last failure

    def save(self, train_state: state.TrainState) -> Path:
        """Collective: every rank calls it (state.stage), rank 0 writes (state.write). Returns
        the step directory (still being written when async)."""
        self.wait()
        staged = state.stage(train_state)
        if self.cfg.async_save:
            if staged is not None:
                self._thread = threading.Thread(
                    target=self._write, args=(staged,), name=f"mm_moe-checkpoint-{staged.step}"
                )
                self._thread.start()
        else:
            if staged is not None:
                self._write(staged)
            self._agree()
        return self.root / layout.step_dir_name(train_state.step)

    def _write(self, staged: state.StagedCheckpoint) -> None:
        try:
            state.write(staged, self.root, self.cfg.keep_last, self.save_file)
        except Exception as exc:  # noqa: BLE001 - any failure is reported on every rank
            self._failure = (staged.step, self.root, exc)

    def wait(self) -> None:
        """Collective: the write in flight is finished and its outcome agreed by all ranks."""
        if not self.cfg.async_save:
            return  # a synchronous save is complete (and agreed) when it returns
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._agree()

    close = wait

    def _agree(self) -> None:
        failed = torch.tensor([1.0 if self._failure else 0.0], device=self.device)
        if all_reduce_sum(failed).item() == 0:
            return
        self.write_errors += 1
        if self._failure is not None:  # rank 0, which wrote
            step, root, exc = self._failure
            self._failure = None
            path = getattr(exc, "filename", None) or root
            reason = getattr(exc, "strerror", None) or str(exc)
            latest = layout.latest_step_dir(root)
            message = (
                f"checkpoint of step {step} not saved: writing {path} failed: {reason} "
                f"({exc.__class__.__name__}). The previous checkpoint "
                f"{latest if latest is not None else '(none)'} is intact"
            )
        else:
            exc, message = None, "a checkpoint was not saved: the write on rank 0 failed"
        if self.cfg.on_write_error == "stop":
            raise CheckpointWriteError(
                f"{message}; checkpoint.on_write_error=stop. Free space or fix {self.cfg.dir}, "
                "then resume with checkpoint.resume=auto"
            ) from exc
        log.error(
            "%s; checkpoint.on_write_error=continue: training goes on (%d failed writes)",
            message,
            self.write_errors,
        )

    def counters(self) -> dict[str, int]:
        return {"checkpoint/write_errors": self.write_errors}
