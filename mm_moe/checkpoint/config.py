"""Checkpoint configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    # Where step directories go (step_00000010/ ...); defaults to <trainer.run_dir>/checkpoints.
    dir: str = ""
    # Save every `interval` optimizer steps, and at the end of training; 0 means never.
    interval: int = 0
    # none: start fresh; auto: the latest complete checkpoint in `dir` (fresh if there is none);
    # or a path to a step directory or to a checkpoint directory holding `latest`.
    resume: str = "none"
    # Keep the newest `keep_last` step directories; 0 keeps all.
    keep_last: int = 0
    # A fresh run (resume=none) refuses a `dir` that already holds checkpoints unless this is true.
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.interval and checkpoint.keep_last must be >= 0")
        if not self.resume:
            raise ValueError("checkpoint.resume must be none, auto or a checkpoint path")
