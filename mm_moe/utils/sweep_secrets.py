"""Keep secrets out of Hydra's `<sweep dir>/multirun.yaml`.

Hydra's sweeper saves the whole config of a multirun (`-m`), every override as typed, to
`multirun.yaml` before the first job. A Hydra callback (registered under `hydra.callbacks` in
the entry points' configs) notes where that file goes and masks secret values in it
(utils/scrub.py) as soon as a job starts and when the sweep ends; the entry point masks it once
more when the sweep stops on an error before any job ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mm_moe.utils.scrub import scrub_text

MULTIRUN_YAML = "multirun.yaml"
# multirun.yaml files of sweeps started in this process.
_PENDING: set[Path] = set()


def scrub_file(path: Path) -> None:
    """Rewrite `path` with secrets masked (nothing to do when absent or clean)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return
    clean = scrub_text(text)
    if clean != text:
        tmp = path.with_name(f".{path.name}.scrubbed")
        tmp.write_text(clean)
        tmp.replace(path)


def scrub_sweep_config() -> None:
    """Mask secrets in the multirun.yaml of every sweep this process started."""
    for path in sorted(_PENDING):
        scrub_file(path)


def _sweep_file(config) -> Path:
    return Path(str(config.hydra.sweep.dir)) / MULTIRUN_YAML


class ScrubSweepConfig(Callback):
    """Hydra callback: `hydra.callbacks.scrub_secrets._target_` names it."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _PENDING.add(_sweep_file(config))

    def on_job_start(self, config, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:  # also on a remote (submitit) node
            scrub_file(_sweep_file(config))

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        scrub_file(_sweep_file(config))
