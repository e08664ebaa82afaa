"""Roll back after a loss spike: reload the last checkpoint and go on with the data after the
offending batch (PaLM restarted ~100 steps back and skipped 200-500 batches; OLMo did alike).

The model, optimizer, LR schedule and RNG states come from the checkpoint; the data position
does not: the loader stays where it is, past the offending batch, so the batches between the
checkpoint and the spike are skipped, not replayed. The step counter keeps counting global
batches (metrics and wandb steps only go forward); the LR schedule restarts from the
checkpoint's position.
"""

from __future__ import annotations

import logging

from mm_moe.checkpoint import layout
from mm_moe.checkpoint import state as ckpt_state
from mm_moe.parallel.distributed import gather_objects

log = logging.getLogger("mm_moe")


class _KeepPosition:
    """The loader, as `state.load` sees it during a rollback: its position is not restored."""

    def __init__(self, loader):
        self.loader = loader

    def load_state_dict(self, state: dict) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self.loader, name)


def rollback(guard, checkpointer, step: int, engine, loader, rank: int, world: int) -> int | None:
    """Collective. Returns the step of the checkpoint rolled back to; None when there is none
    (the offending step's update was dropped all the same)."""
    checkpointer.wait()  # an async save in flight may be the checkpoint to return to
    root = checkpointer.root
    # Rank 0's listing decides for all: a file system that caches listings per node (NFS)
    # could show other ranks an older newest step, or none (a rank skipping the load hangs).
    steps = [s for s in layout.complete_steps(root) if s < step][-1:]
    steps = gather_objects(steps)[0]
    if not steps:
        guard.counts["skipped_steps"] += 1
        log.warning(
            "step %d: no checkpoint in %s to roll back to; the step's update was skipped",
            step,
            root,
        )
        return None
    target = root / layout.step_dir_name(steps[-1])
    ckpt_state.load(target, engine, _KeepPosition(loader), rank, world)
    engine.global_steps = step  # DeepSpeed's count follows the loop's, which goes on
    guard.counts["rollbacks"] += 1
    log.warning(
        "step %d: rolled back to the checkpoint of step %d (%s); training continues with the "
        "batches after step %d's (data of steps skipped: %d)",
        step,
        steps[-1],
        target,
        step,
        step - steps[-1],
    )
    return steps[-1]
