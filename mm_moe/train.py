"""Training entry point: `python -m mm_moe.train [overrides]`, also under torchrun.

Composes configs/train.yaml with Hydra, validates it once against mm_moe.config.TrainConfig,
then builds the run (`build_training`) and fits it (`Trainer.fit`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mm_moe.cli import (
    CONFIG_DIR,
    ENTRY_GROUPS,
    build_config,
    check_command_line,
    exits_on_failure,
    fail,
    hydra_errors,
    setup_logging,
)
from mm_moe.config import ConfigError, TrainConfig
from mm_moe.config.overrides import check_overrides, options_first
from mm_moe.utils.sweep_secrets import scrub_sweep_config

PROG = "mm_moe.train"
__all__ = ["CONFIG_DIR", "ENTRY_GROUPS", "build_config", "main"]


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


def _warn_upcycled_without_weights(cfg: TrainConfig) -> None:
    """`--config-dir FOLDER experiment=upcycled` gives the upcycled model's shape; its weights
    come only with checkpoint.resume=FOLDER (an overlay may not set it). Without, the model
    would train from random weights: said before the run starts."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    from mm_moe.checkpoint import layout

    runtime = HydraConfig.get().runtime
    if runtime.choices.get("experiment") != "upcycled":
        return
    resume = cfg.checkpoint.resume
    if resume != "none" and (resume != "auto" or layout.complete_steps(Path(cfg.checkpoint.dir))):
        return
    folders = [s.path for s in runtime.config_sources if s.provider == "command-line"]
    folder = folders[0].removeprefix("file://") if folders else "<the upcycled folder>"
    logging.getLogger("mm_moe").warning(
        "experiment=upcycled with checkpoint.resume=%s: the model has the upcycled shape but "
        "random weights. To train the upcycled weights, pass checkpoint.resume=%s",
        resume,
        folder,
    )


INTERRUPTED = (
    "checkpoint.resume=auto continues from the last checkpoint written (a SIGTERM, SIGUSR1 or "
    "SIGUSR2 writes one first)"
)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    _sweep_run_dir(cfg)
    try:
        train_cfg = build_config(cfg)
    except ConfigError as exc:
        fail(PROG, str(exc))
    rank = os.environ.get("RANK", 0)
    setup_logging(
        train_cfg.logging.level, f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    )
    _warn_upcycled_without_weights(train_cfg)
    from mm_moe.trainer.trainer import run

    try:
        with exits_on_failure(PROG, INTERRUPTED):
            run(train_cfg)
    finally:
        # Sequential multirun jobs share this process (and DeepSpeed's communicator): keep the
        # process group for the next job; it ends with the process.
        if not _is_multirun():
            from mm_moe.parallel.distributed import shutdown

            shutdown()
    from mm_moe.trainer.preemption import pass_on

    pass_on()  # a launcher's handler of the signal that stopped the run (submitit requeues)


def main() -> None:
    # Every error, Hydra's own included, ends in cli.failure: exit 2 for the user's mistakes,
    # one message, secrets masked.
    with hydra_errors(PROG):
        sys.argv[1:] = options_first(sys.argv[1:])
        check_command_line(sys.argv[1:])
        sys.argv[1:] = check_overrides(sys.argv[1:], TrainConfig, ENTRY_GROUPS)
        try:
            _hydra_main()
        finally:
            scrub_sweep_config()


if __name__ == "__main__":
    main()
