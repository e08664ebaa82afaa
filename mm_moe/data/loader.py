"""Deals each optimizer step's global batch out to ranks and micro-batches.

The global batch at step s is rows [s*G, (s+1)*G) of the source, whatever the world size:
rank r takes the contiguous block [r*G/W, (r+1)*G/W) and cuts it into micro-batches.
The loader's state is just the next step, so a checkpoint resumes at any world size.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

import numpy as np

from mm_moe.data.batch import Batch
from mm_moe.errors import UserError

# The way to train a checkpoint's weights on other data, as every refused resume says it: a
# run's own checkpoints always resume whole (a restart must not start over), so another folder.
WEIGHTS_ONLY = (
    "checkpoint.weights_only=true with checkpoint.resume=<that step> and another "
    "trainer.run_dir (fresh optimizer, schedule and data position from step 0; in the run's "
    "own folder its checkpoints resume whole)"
)


class StepLoader:
    # next() is local work (no collectives): data/prefetch.py may call it on its own thread.
    prefetch_safe = True

    def __init__(
        self, source, rank: int, dp_world_size: int, micro_batch_size: int, global_batch_size: int
    ):
        assert global_batch_size % (dp_world_size * micro_batch_size) == 0
        self.source, self.vocab = source, source.vocab
        self.rank, self.dp_world_size = rank, dp_world_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.step = 0

    def micro_batches(self, step: int) -> list[Batch]:
        per_rank = self.global_batch_size // self.dp_world_size
        first = step * self.global_batch_size + self.rank * per_rank
        batches = []
        for start in range(first, first + per_rank, self.micro_batch_size):
            rows = [self.source.row(i) for i in range(start, start + self.micro_batch_size)]
            tokens, modality, doc, pos = (np.stack(a) for a in zip(*rows))
            valid = tokens != self.vocab.pad
            batches.append(Batch.from_tokens(tokens, modality, doc, pos, valid))
        return batches

    def next(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        batches = self.micro_batches(self.step)
        self.step += 1
        return batches

    def described(self) -> dict:
        """What the rows of a step depend on besides the step: a resume needs the same."""
        out = {"trainer.global_batch_size": self.global_batch_size}
        for key, attr in (("trainer.seed", "seed"), ("data.seq_len", "seq_len")):
            if hasattr(self.source, attr):
                out[key] = getattr(self.source, attr)
        if is_dataclass(getattr(self.source, "cfg", None)):
            out["data.synthetic"] = asdict(self.source.cfg)
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "described": self.described()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("described"), self.described()  # older checkpoints: none
        if saved is not None and saved != now:
            raise UserError(
                "the checkpoint's data position was saved for other synthetic data "
                f"({changed_keys(saved, now)}); resuming exactly needs the same. To train "
                f"its weights on other data: {WEIGHTS_ONLY}"
            )
        self.step = int(state["step"])


def changed_keys(saved: dict, now: dict) -> str:
    """`key: checkpoint X, this run Y` for each key that differs (a source added or removed
    shows as its keys on one side only)."""
    keys = [k for k in {**saved, **now} if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}" for k in keys)
