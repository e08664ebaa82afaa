"""Parallelism configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mm_moe.errors import UserError


def optimizer_zero_stage(zero_stage: int, bf16: bool) -> int:
    """The ZeRO stage the optimizer runs at: bf16 at stage 0 takes DeepSpeed's ZeRO-1 bf16
    optimizer (parallel/deepspeed_fixes.py `zero_stage_for` says why), which shards the
    optimizer state over the data-parallel ranks."""
    return 1 if bf16 and zero_stage == 0 else zero_stage


@dataclass
class ParallelConfig:
    # ZeRO optimizer-state (1) and gradient (2) sharding over the data-parallel group.
    zero_stage: Literal[0, 1, 2] = 0
    # Collective backend; auto = nccl on GPU, gloo on CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Ranks that share one copy of the experts (all-to-all between them). 0: the largest size
    # that divides the world size and every expert group's count.
    expert_parallel_size: int = 1
    # Not implemented yet; kept so configs and process-group layouts keep their place.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Timeout of every collective, so a lost rank ends the job instead of hanging it.
    timeout_s: int = 600
    # ZeRO's gradient reduction overlapping the backward; null: on GPUs (NCCL on its own
    # stream), off on CPU (over gloo it only adds copies).
    overlap_comm: bool | None = None
    # Elements per gradient bucket that ZeRO reduces at once (DeepSpeed's default).
    reduce_bucket_size: int = 500_000_000

    def __post_init__(self) -> None:
        if self.expert_parallel_size < 0:
            raise UserError(
                f"parallel.expert_parallel_size={self.expert_parallel_size} must be >= 1, "
                "or 0 for the largest size that divides the world size and the expert counts"
            )
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) != 1:
                value = getattr(self, name)
                raise UserError(f"parallel.{name}={value} is not supported yet; use 1")
        if self.timeout_s <= 0:
            raise UserError(f"parallel.timeout_s={self.timeout_s} must be positive")
        if self.reduce_bucket_size <= 0:
            raise UserError(
                f"parallel.reduce_bucket_size={self.reduce_bucket_size} must be positive "
                "(elements per gradient bucket; DeepSpeed's default is 500000000)"
            )
