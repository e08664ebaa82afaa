"""Data configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mm_moe.data.synthetic import SyntheticPatternsConfig


@dataclass
class DataConfig:
    # Which source feeds training. `synthetic_patterns` is the in-process interim source.
    source: Literal["synthetic_patterns"] = "synthetic_patterns"
    # Tokens per packed training sequence.
    seq_len: int = 128
    synthetic: SyntheticPatternsConfig = field(default_factory=SyntheticPatternsConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be at least 2")

    def build(
        self,
        seed: int,
        rank: int,
        dp_world_size: int,
        micro_batch_size: int,
        global_batch_size: int,
    ):
        from mm_moe.data.loader import StepLoader
        from mm_moe.data.synthetic import SyntheticPatterns

        source = SyntheticPatterns(self.synthetic, self.seq_len, seed)
        return StepLoader(source, rank, dp_world_size, micro_batch_size, global_batch_size)
