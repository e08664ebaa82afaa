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

from mm_moe.config import ConfigError, TrainConfig, from_dict
from mm_moe.config.overrides import check_overrides
from mm_moe.config.schema import GROUPS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
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


def _fail(message: str) -> None:
    print(f"mm_moe.train: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_config(cfg: DictConfig) -> TrainConfig:
    """The one place a DictConfig becomes dataclasses."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return from_dict(TrainConfig, container)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train_cfg = build_config(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    _setup_logging(train_cfg.logging.level)
    from mm_moe.trainer.loop import run

    try:
        run(train_cfg)
    except ValueError as exc:
        if os.environ.get("MM_MOE_TRACEBACK"):
            raise
        _fail(str(exc))
    finally:
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
