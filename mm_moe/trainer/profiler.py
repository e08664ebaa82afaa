"""trainer.profile=START:END: a torch.profiler trace of optimizer steps START..END (inclusive),
written to <run_dir>/profile/rank<R>_steps<START>-<END>.pt.trace.json by every rank.

The file is Chrome's trace-event JSON (chrome://tracing, https://ui.perfetto.dev), and its
name ends in `.pt.trace.json`, so TensorBoard's profiler plugin (torch-tb-profiler) reads the
folder too. Each step is a `ProfilerStep#N` range; CUDA kernels are recorded on GPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from mm_moe.trainer.hooks import Hook

log = logging.getLogger("mm_moe")


class ProfileHook(Hook):
    """Starts the profiler after step START-1 (or at the start, when the run begins inside the
    window) and writes the trace after step END, or when the run ends first."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.prof: profile | None = None
        self.range: record_function | None = None  # the step being profiled

    def path(self, trainer) -> Path:
        t = trainer.training
        name = f"rank{t.dist.rank}_steps{self.first}-{self.last}.pt.trace.json"
        return Path(t.cfg.trainer.run_dir) / "profile" / name

    def _start(self, trainer, step: int) -> None:
        activities = [ProfilerActivity.CPU]
        if trainer.training.dist.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities, record_shapes=True)
        self.prof.start()
        self._open_step(step)

    def _open_step(self, step: int) -> None:
        """One `ProfilerStep#<step>` range per optimizer step (TensorBoard's plugin splits the
        trace at these; without a schedule torch.profiler records none)."""
        if self.range is not None:
            self.range.__exit__(None, None, None)
        self.range = record_function(f"ProfilerStep#{step}") if step else None
        if self.range is not None:
            self.range.__enter__()

    def _stop(self, trainer) -> None:
        if trainer.training.dist.device.type == "cuda":
            torch.cuda.synchronize()  # the last step's kernels are in the trace
        self._open_step(0)
        self.prof.stop()
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(path))
        self.prof = None
        if trainer.training.dist.is_main:
            log.info("trainer.profile: trace of steps %d-%d in %s", self.first, self.last, path)

    def before_fit(self, trainer) -> None:
        t = trainer.training
        if t.start_step >= self.last or t.cfg.trainer.max_steps < self.first:
            log.warning(
                "trainer.profile=%d:%d: outside this run's steps %d-%d, nothing profiled",
                self.first,
                self.last,
                t.start_step + 1,
                t.cfg.trainer.max_steps,
            )
            return
        if self.last > t.cfg.trainer.max_steps:
            log.warning(
                "trainer.profile=%d:%d ends after trainer.max_steps=%d: steps %d-%d profiled",
                self.first,
                self.last,
                t.cfg.trainer.max_steps,
                max(self.first, t.start_step + 1),
                t.cfg.trainer.max_steps,
            )
            self.last = t.cfg.trainer.max_steps  # the trace's name says the steps it holds
        if t.start_step + 1 >= self.first:  # resumed inside the window: what is left of it
            self._start(trainer, t.start_step + 1)

    def after_step(self, trainer, step: int, record: dict) -> None:
        if self.prof is not None and step >= self.last:
            self._stop(trainer)
        elif self.prof is not None:
            self._open_step(step + 1)
        elif step + 1 == self.first:
            self._start(trainer, step + 1)

    def after_fit(self, trainer) -> None:
        if self.prof is not None:  # the run ended inside the window (max_steps, preemption)
            self._stop(trainer)
