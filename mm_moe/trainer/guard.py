"""What happens to a step whose loss or gradients are bad, decided the same way on every rank.

`train_step` all-reduces the loss sums and a per-rank "saw a NaN/inf" flag once, before the
optimizer step, and asks `StepGuard.decide`:

- non-finite loss or gradients on any rank: `trainer.on_nonfinite=skip` drops the update
  (parameters, Adam moments and step count, LR schedule unchanged; the data moves on) and counts
  it in `skipped_steps`; `stop` ends the run before the optimizer step;
- a loss spike (z-score over a window, see spikes.py): `trainer.spike.action` log | skip |
  rollback (trainer/rollback.py reloads the last checkpoint);
- more than `trainer.max_consecutive_skips` dropped steps in a row end the run.
"""

from __future__ import annotations

import logging

from mm_moe.trainer.config import TrainerConfig
from mm_moe.trainer.spikes import SpikeDetector

log = logging.getLogger("mm_moe")

COUNTERS = ("skipped_steps", "nonfinite_steps", "loss_spikes", "rollbacks")


# Non-finite gradients on every data-parallel rank with finite losses everywhere: one rank's,
# spread by the gradient reduction, and which one is not known.
SPREAD_GRADIENTS = "gradients on every rank"


class TrainingHalted(RuntimeError):
    """The run cannot go on; raised on every rank at the same step."""

    brief = True  # the message says it all: no traceback

    agreed = True  # every rank raises it together: no lost rank to look for


class StepGuard:
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.spikes = SpikeDetector(cfg.spike)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.consecutive = 0
        self.last_action = "apply"

    def decide(
        self, step: int, loss: float, bad_ranks: list[int], what: str = "loss or gradients"
    ) -> str:
        """The update of this step: "apply", "skip" or "rollback". May raise TrainingHalted.
        `what` the bad ranks saw non-finite (SPREAD_GRADIENTS: every rank's gradients, every
        loss finite)."""
        self.last_action = self._decide(step, loss, bad_ranks, what)
        return self.last_action

    def _decide(self, step: int, loss: float, bad_ranks: list[int], what: str) -> str:
        if bad_ranks:
            self.counts["nonfinite_steps"] += 1
            where = f"non-finite {what} on rank(s) {', '.join(map(str, bad_ranks))}"
            if what == SPREAD_GRADIENTS:
                where = (
                    f"non-finite gradients with finite losses on all {len(bad_ranks)} ranks: the "
                    "data-parallel reduction spreads one rank's to every rank, so which rank "
                    "made them is not known"
                )
            if self.cfg.on_nonfinite == "stop":
                raise TrainingHalted(
                    f"step {step}: {where}; trainer.on_nonfinite=stop: stopping before the "
                    f"optimizer step (the last checkpoint is intact). Set "
                    "trainer.on_nonfinite=skip to drop such steps instead"
                )
            return self._skip(step, where)
        spike, z = self.spikes.is_spike(loss)
        if spike:
            self.counts["loss_spikes"] += 1
            what = (
                f"loss spike: loss {loss:.4f} is {z:.1f} standard deviations above the mean of "
                f"the last {len(self.spikes.losses)} steps (trainer.spike.zscore="
                f"{self.cfg.spike.zscore})"
            )
            action = self.cfg.spike.action
            if action == "skip":
                return self._skip(step, what)
            if action == "rollback":
                self._count_dropped(step, what)
                log.warning("step %d: %s; trainer.spike.action=rollback", step, what)
                return "rollback"
            log.warning("step %d: %s; trainer.spike.action=log: update applied", step, what)
        self.spikes.add(loss)
        self.consecutive = 0
        return "apply"

    def _count_dropped(self, step: int, reason: str) -> None:
        self.consecutive += 1
        if self.consecutive > self.cfg.max_consecutive_skips:
            raise TrainingHalted(
                f"step {step}: {reason}; {self.consecutive} steps in a row were dropped, more "
                f"than trainer.max_consecutive_skips={self.cfg.max_consecutive_skips}: stopping. "
                "Look for bad data or a too high learning rate, then resume from the last "
                "checkpoint"
            )

    def _skip(self, step: int, reason: str) -> str:
        self._count_dropped(step, reason)
        self.counts["skipped_steps"] += 1
        log.warning(
            "step %d: %s; update skipped (parameters, optimizer state and LR schedule "
            "unchanged; skipped steps so far: %d)",
            step,
            reason,
            self.counts["skipped_steps"],
        )
        return "skip"

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    def state_dict(self) -> dict:
        """For the checkpoint's meta.json: a resumed run counts and detects like an
        uninterrupted one."""
        return {"guard": {**self.counts, "spike_window": self.spikes.state_dict()}}

    def load_state_dict(self, meta: dict) -> None:
        state = meta.get("guard")
        if not state:
            return
        for key in COUNTERS:
            self.counts[key] = int(state.get(key, 0))
        self.spikes.load_state_dict(state.get("spike_window", []))
