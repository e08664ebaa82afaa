"""Single-device model code. Parallelism is applied from outside, in mm_moe.parallel."""

from mm_moe.model.config import ModelConfig

__all__ = ["ModelConfig"]
