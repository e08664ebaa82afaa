"""Training entry point: `python -m mm_moe.train [overrides]`, also under torchrun.

Composes configs/train.yaml with Hydra, validates it once against mm_moe.config.TrainConfig,
and hands plain dataclasses to the training loop.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from mm_moe.cli import CONFIG_DIR, failure
from mm_moe.config import ConfigError, TrainConfig, from_dict
from mm_moe.config.overrides import check_overrides
from mm_moe.config.schema import GROUPS

ENTRY_GROUPS = (*GROUPS, "experiment")


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def _fail(message: str, code: int = 2) -> None:
    """Exit with `code`: 2 for configuration and input mistakes, 1 for failures in training."""
    print(f"mm_moe.train: error: {message}", file=sys.stderr)
    sys.exit(code)


def build_config(cfg: DictConfig) -> TrainConfig:
    """The one place a DictConfig becomes dataclasses."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return from_dict(TrainConfig, container)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_run_dir(cfg: DictConfig) -> None:
    """In a multirun, give each job its own run directory unless the user chose one."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if _is_multirun() and not any("trainer.run_dir=" in o for o in hydra_cfg.overrides.task):
        cfg.trainer.run_dir = hydra_cfg.runtime.output_dir


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    _sweep_run_dir(cfg)
    try:
        train_cfg = build_config(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    _setup_logging(train_cfg.logging.level)
    from mm_moe.trainer.loop import run

    try:
        run(train_cfg)
    except Exception as exc:  # noqa: BLE001 - Hydra would print the overrides, secrets included
        if os.environ.get("MM_MOE_TRACEBACK"):
            raise
        sys.exit(failure("mm_moe.train", exc))
    finally:
        # Sequential multirun jobs share this process (and DeepSpeed's communicator): keep the
        # process group for the next job; it ends with the process.
        if not _is_multirun():
            from mm_moe.parallel.distributed import shutdown

            shutdown()


def main() -> None:
    try:
        sys.argv[1:] = check_overrides(sys.argv[1:], TrainConfig, ENTRY_GROUPS)
    except ConfigError as exc:
        _fail(str(exc))
    _hydra_main()


if __name__ == "__main__":
    main()
