"""Trainer configuration: steps, batch sizes, precision, where the run writes, and what a bad
step (non-finite values, a loss spike) does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mm_moe.errors import UserError


@dataclass
class SpikeConfig:
    """Loss-spike detection: the z-score of a step's loss against the losses of the last
    `window` applied steps."""

    # Applied steps the statistics look back over; 0 turns detection off.
    window: int = 100
    # A loss more than `zscore` standard deviations above the window's mean is a spike.
    zscore: float = 6.0
    # Losses the window must hold before detection starts.
    min_steps: int = 20
    # log: report it; skip: drop the step's update (like a non-finite step); rollback: reload
    # the last checkpoint and continue with the batches after the offending one (PaLM, OLMo).
    action: Literal["log", "skip", "rollback"] = "log"

    def __post_init__(self) -> None:
        if self.window < 0:
            raise UserError(f"trainer.spike.window={self.window} must be >= 0 (0: off)")
        if self.zscore <= 0:
            raise UserError(f"trainer.spike.zscore={self.zscore} must be positive")
        if self.window and not 2 <= self.min_steps <= self.window:
            raise UserError(
                f"trainer.spike.min_steps={self.min_steps} must be between 2 and "
                f"trainer.spike.window={self.window}"
            )


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
    # 0: global / data-parallel ranks (no accumulation), whatever the number of processes.
    micro_batch_size: int = 0  # 0: global / data-parallel ranks
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Peak FLOP/s of one device for MFU; 0 looks the device up (CUDA only), or leaves MFU out.
    peak_flops: float = 0.0
    # Per-process CPU threads for torch; 0 leaves torch's default.
    cpu_threads: int = 0
    # torch.compile each decoder block (MoE and mixture-of-depths blocks: their attention;
    # mm_moe/parallel/compile.py says why).
    compile: bool = False
    # A NaN or inf in the loss or the gradients of any rank (agreed by all ranks before the
    # optimizer step): skip leaves parameters, optimizer state and LR schedule unchanged and
    # counts the step in `skipped_steps`; stop ends the run with an error.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    # Skipped steps in a row (non-finite or spike) after which the run stops.
    max_consecutive_skips: int = 10
    spike: SpikeConfig = field(default_factory=SpikeConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_interval", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"trainer.{name}={getattr(self, name)} must be positive")
        if self.micro_batch_size < 0:
            raise UserError(
                f"trainer.micro_batch_size={self.micro_batch_size} must be positive, or 0 to "
                "take trainer.global_batch_size / data-parallel ranks"
            )
        if self.micro_batch_size and self.global_batch_size % self.micro_batch_size:
            raise UserError(
                f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size}"
            )
        if not self.run_dir:
            raise UserError("trainer.run_dir must not be empty")
        if self.max_consecutive_skips < 0:
            raise UserError(
                f"trainer.max_consecutive_skips={self.max_consecutive_skips} must be >= 0"
            )

    def micro_batch_for(self, dp_world_size: int) -> int:
        """The micro-batch size at this data-parallel size (resolves 0)."""
        if self.micro_batch_size:
            return self.micro_batch_size
        if self.global_batch_size % dp_world_size:
            raise UserError(
                f"trainer.micro_batch_size=0 takes trainer.global_batch_size / data-parallel "
                f"ranks, but trainer.global_batch_size={self.global_batch_size} is not a "
                f"multiple of the {dp_world_size} ranks; choose a global batch size that is"
            )
        return self.global_batch_size // dp_world_size

    def grad_accumulation_steps(self, dp_world_size: int) -> int:
        per_step = self.micro_batch_size * dp_world_size
        if self.global_batch_size % per_step:
            raise UserError(
                f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size} x {dp_world_size} "
                "data-parallel ranks"
            )
        return self.global_batch_size // per_step
