"""Trainer configuration: steps, batch sizes, precision, where the run writes, and what a bad
step (non-finite values, a loss spike) does; the optimizer (`optim`) and logging (`logging`:
metrics.jsonl is always written, wandb is offline by default) groups."""

from __future__ import annotations

import math
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
    # Peak bf16 dense TFLOPS of one device for MFU; 0 looks the device's exact name up
    # (trainer/peak.py: H100 SXM/PCIe/NVL, H200, B200, A100), or leaves MFU out (logged).
    peak_tflops: float = 0.0
    # Per-process CPU threads for torch; 0 leaves torch's default.
    cpu_threads: int = 0
    # torch.compile each decoder block (MoE and mixture-of-depths blocks: their attention;
    # mm_moe/parallel/compile.py says why).
    compile: bool = False
    # Activations recomputed in backward (mm_moe/parallel/checkpointing.py): none; full (every
    # decoder block keeps only its input); selective (the attention of every block).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # A NaN or inf in the loss or the gradients of any rank (agreed by all ranks before the
    # optimizer step): skip leaves parameters, optimizer state and LR schedule unchanged and
    # counts the step in `skipped_steps`; stop ends the run with an error.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    # Skipped steps in a row (non-finite or spike) after which the run stops.
    max_consecutive_skips: int = 10
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # The dtype gradients accumulate in over micro-batches (DeepSpeed's
    # data_types.grad_accum_dtype): auto, the training dtype (bf16 under bf16); fp32, DeepSpeed's
    # bf16 optimizer accumulating in fp32 (ZeRO-0/1: parallel.zero_stage=2 accumulates in bf16).
    grad_accum_dtype: Literal["auto", "fp32"] = "auto"
    # START:END writes a torch.profiler trace of optimizer steps START..END (inclusive) into
    # <run_dir>/profile/ (Chrome / TensorBoard format; trainer/profiler.py); empty: off.
    profile: str = ""

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_interval", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"trainer.{name}={getattr(self, name)} must be positive")
        if self.cpu_threads < 0:
            raise UserError(
                f"trainer.cpu_threads={self.cpu_threads} must be >= 0 (0: torch's default)"
            )
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
        if self.peak_tflops < 0:
            raise UserError(
                f"trainer.peak_tflops={self.peak_tflops} must be >= 0 (0: looked up by device)"
            )
        if self.max_consecutive_skips < 0:
            raise UserError(
                f"trainer.max_consecutive_skips={self.max_consecutive_skips} must be >= 0"
            )
        self.profile_steps()  # validates trainer.profile

    def profile_steps(self) -> tuple[int, int] | None:
        """trainer.profile as (first, last) step, inclusive; None when off."""
        if not self.profile:
            return None
        start, sep, end = str(self.profile).partition(":")
        try:
            first, last = int(start), int(end)
        except ValueError:
            first = last = -1
        if not sep or not 1 <= first <= last:
            raise UserError(
                f"trainer.profile={self.profile!r} must be START:END, optimizer steps with "
                "1 <= START <= END (e.g. trainer.profile=5:7), or empty (off)"
            )
        return first, last

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
                "data-parallel ranks (trainer.micro_batch_size=0 takes the global batch over "
                "the ranks, accumulating none)"
            )
        return self.global_batch_size // per_step


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    # The cosine decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    # Steps of the cosine after warmup; 0 decays over the rest of trainer.max_steps.
    decay_steps: int = 0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Global grad-norm clipping; 0 turns it off.
    grad_clip: float = 1.0
    # torch's fused AdamW kernel (CPU and CUDA), one pass over each tensor; false: the
    # per-tensor loop (torch's default on CPU), which took 3.7x as long for the demo's 5.4M
    # parameters on one CPU thread. The two differ only in rounding.
    fused: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise UserError(f"optim.lr={self.lr} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise UserError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise UserError("optim.weight_decay and optim.grad_clip must be >= 0, optim.eps > 0")

    def build(self, model, exclude=(), router_lr_scale: float = 1.0):
        """AdamW over the parameters not in `exclude` (trainer/optim.py)."""
        from mm_moe.trainer.optim import adamw

        return adamw(self, model, exclude, router_lr_scale)

    def lr_factor(self, step: int, max_steps: int) -> float:
        """Multiplier of `lr` for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = self.decay_steps or max(1, max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    def build_schedule(self, optimizer, max_steps: int):
        """Warmup then cosine: `lr_factor` as a torch LR scheduler (trainer/optim.py)."""
        from mm_moe.trainer.optim import cosine_schedule

        return cosine_schedule(self, optimizer, max_steps)


@dataclass
class WandbConfig:
    # offline writes a local run under <run_dir>/wandb (sync it later with `wandb sync`).
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mm_moe"
    entity: str | None = None
    # Run name; empty uses the experiment name.
    name: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class RoutingWarningConfig:
    """When to warn that an expert group's routing degenerates (trainer/hooks.py)."""

    # More than this share of the group's tokens processed by no expert...
    unprocessed: float = 0.5
    # ... or a mean gate of the selected pairs below this (sigmoid scores only: softmax
    # gates shrink with the number of experts by design) ...
    gate_mean: float = 0.2
    # ... over this many consecutive logged steps; 0 turns the warning off.
    intervals: int = 3


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    routing_warning: RoutingWarningConfig = field(default_factory=RoutingWarningConfig)
    # auto: a progress bar in a terminal, plain lines otherwise (logs, CI).
    progress: Literal["auto", "bar", "lines"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
