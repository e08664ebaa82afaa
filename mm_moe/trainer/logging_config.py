"""Logging configuration; the dataclasses live in trainer/config.py (this path still imports)."""

from mm_moe.trainer.config import LoggingConfig, RoutingWarningConfig, WandbConfig

__all__ = ["LoggingConfig", "RoutingWarningConfig", "WandbConfig"]
