"""The root schema every composed Hydra config is validated against.

Each group's dataclass lives in the `config.py` of the package it builds (modules that load
no model code, so anyone may import them); this file only assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mm_moe.checkpoint.config import CheckpointConfig
from mm_moe.data.config import DataConfig
from mm_moe.errors import UserError
from mm_moe.eval.config import EvalConfig
from mm_moe.model.config import ModelConfig
from mm_moe.model.moe.config import MoEConfig
from mm_moe.parallel.config import ParallelConfig
from mm_moe.tokenization.config import TokenizerConfig
from mm_moe.trainer.config import LoggingConfig, OptimConfig, TrainerConfig

GROUPS = (
    "model",
    "moe",
    "data",
    "tokenizer",
    "optim",
    "parallel",
    "trainer",
    "checkpoint",
    "logging",
    "eval",
)


@dataclass
class TrainConfig:
    # The experiment's name (wandb run name, default run directory).
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.data.use_tokenizer(self.tokenizer)
        if not self.checkpoint.dir:
            self.checkpoint.dir = f"{self.trainer.run_dir}/checkpoints"
        self.model.check_moe(self.moe)
        self.eval.check_data(self.data.source)
        self.tokenizer.refuse_raw_text(self._shard_formats())
        if self.trainer.grad_accum_dtype == "fp32" and self.parallel.zero_stage >= 2:
            raise UserError(
                "trainer.grad_accum_dtype=fp32 needs parallel.zero_stage 0 or 1 (DeepSpeed's "
                f"bf16 optimizer); parallel.zero_stage={self.parallel.zero_stage} accumulates "
                "gradients in the training dtype: use trainer.grad_accum_dtype=auto with it"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise UserError(
                f"data.seq_len={self.data.seq_len} exceeds "
                f"model.max_seq_len={self.model.max_seq_len}"
            )

    def _shard_formats(self) -> list[tuple[str, str]]:
        """(key, format) of every shard source the run reads, training and held-out."""
        train = self.data.sources if self.data.source == "webdataset" else []
        return [(f"data.sources[{i}].format", s.format) for i, s in enumerate(train)] + [
            (f"eval.sources[{i}].format", s.format) for i, s in enumerate(self.eval.sources)
        ]

    def for_world(self, world_size: int) -> TrainConfig:
        """This config with the sizes that follow the number of processes resolved:
        `trainer.micro_batch_size=0` (global batch / ranks) and
        `parallel.expert_parallel_size=0` (the largest that divides the world size and every
        expert group)."""
        trainer = replace(self.trainer, micro_batch_size=self.trainer.micro_batch_for(world_size))
        ep = self.parallel.expert_parallel_size or self.moe.largest_expert_parallel_size(world_size)
        parallel = replace(self.parallel, expert_parallel_size=ep)
        return replace(self, trainer=trainer, parallel=parallel)
