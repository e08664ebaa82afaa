"""Trainer configuration: steps, batch sizes, precision, where the run writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seed: int = 0
    # Log every `log_interval` optimizer steps (and always the last one).
    log_interval: int = 10
    # Everything a run writes: metrics.jsonl, the wandb run, checkpoints by default.
    run_dir: str = "runs/default"
    # Sequences per optimizer step, over all ranks.
    global_batch_size: int = 8
    # Sequences per rank per forward; accumulation = global / (micro * data-parallel ranks).
    micro_batch_size: int = 8
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Peak FLOP/s of one device for MFU; 0 looks the device up (CUDA only), or leaves MFU out.
    peak_flops: float = 0.0
    # Per-process CPU threads for torch; 0 leaves torch's default.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_interval", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be positive")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size}"
            )
        if not self.run_dir:
            raise ValueError("trainer.run_dir must not be empty")

    def grad_accumulation_steps(self, dp_world_size: int) -> int:
        per_step = self.micro_batch_size * dp_world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size} x {dp_world_size} "
                "data-parallel ranks"
            )
        return self.global_batch_size // per_step
