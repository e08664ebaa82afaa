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
