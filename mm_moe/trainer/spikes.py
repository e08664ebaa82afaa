"""Loss-spike detection: the z-score of a step's loss against a window of recent losses.

Only losses of applied steps enter the window, so a run of spikes does not raise the mean it is
judged against. The window is part of the checkpoint: a resumed run detects what the
uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections import deque

from mm_moe.trainer.config import SpikeConfig


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=max(cfg.window, 1))

    def zscore(self, loss: float) -> float | None:
        """How many standard deviations `loss` lies above the window's mean; None while the
        window holds fewer than `min_steps` losses (or detection is off)."""
        if not self.cfg.window or len(self.losses) < self.cfg.min_steps:
            return None
        n = len(self.losses)
        mean = sum(self.losses) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (n - 1))
        # A flat window (std ~ 0) would call any wobble a spike: floor std at 1e-3 x mean.
        return (loss - mean) / max(std, 1e-3 * abs(mean), 1e-12)

    def is_spike(self, loss: float) -> tuple[bool, float | None]:
        z = self.zscore(loss)
        return (z is not None and z > self.cfg.zscore), z

    def add(self, loss: float) -> None:
        if self.cfg.window and math.isfinite(loss):
            self.losses.append(loss)

    def state_dict(self) -> list[float]:
        return list(self.losses)

    def load_state_dict(self, losses: list[float]) -> None:
        self.losses.clear()
        self.losses.extend(losses[-self.losses.maxlen :])
