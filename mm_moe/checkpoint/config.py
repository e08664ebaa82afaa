"""Checkpoint configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mm_moe.errors import UserError


@dataclass
class CheckpointConfig:
    # Where step directories go (step_00000010/ ...); defaults to <trainer.run_dir>/checkpoints.
    dir: str = ""
    # Save every `interval` optimizer steps, and at the end of training; 0 means never.
    interval: int = 0
    # none: start fresh; auto: the latest complete checkpoint in `dir` (fresh if there is none);
    # or a path to a step directory or to a checkpoint directory holding `latest`.
    resume: str = "none"
    # true: take only the model weights of checkpoint.resume (a path, or auto on its first
    # start), with a fresh optimizer, LR schedule and data position from step 0: continue a
    # trained model on other data (other data.sources, num_streams or seed), or fine-tune.
    # The run's own checkpoints (its later resumes, a restarted job) resume whole.
    weights_only: bool = False
    # Keep the newest `keep_last` step directories; 0 keeps all (configs/checkpoint/default.yaml
    # keeps 3).
    keep_last: int = 0
    # A fresh run (resume=none) refuses a `dir` that already holds checkpoints, or a run_dir with
    # an earlier run's metrics.jsonl, unless this is true.
    overwrite: bool = False
    # The key is `checkpoint.async` (a Python keyword, hence the field name): training blocks
    # only while the state is copied to CPU memory; a background thread writes it, and the next
    # save (or the end of the run) waits for it.
    async_save: bool = field(default=False, metadata={"key": "async"})
    # A failed write (full disk, I/O error) never touches the previous checkpoint; stop ends the
    # run with the error, continue logs it, counts it (`checkpoint/write_errors`) and trains on.
    on_write_error: Literal["stop", "continue"] = "stop"

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise UserError("checkpoint.interval and checkpoint.keep_last must be >= 0")
        if not self.resume:
            raise UserError("checkpoint.resume must be none, auto or a checkpoint path")
