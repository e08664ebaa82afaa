"""Logging configuration: metrics.jsonl is always written; wandb is offline by default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # auto: a progress bar in a terminal, plain lines otherwise (logs, CI).
    progress: Literal["auto", "bar", "lines"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
