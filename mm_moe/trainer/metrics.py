"""Metrics sinks: metrics.jsonl (one JSON object per logged step), wandb, and the console.

Only rank 0 writes. On resume the jsonl is cut back to the resumed step, so a resumed run's
file reads like an uninterrupted one. Secret-looking values are masked (utils/scrub.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from mm_moe.trainer import run_lock
from mm_moe.utils.scrub import scrub

log = logging.getLogger("mm_moe")

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        max_steps: int,
        start_step: int,
        logging_cfg,
        wandb_init: dict | None,
        lock: list[Path] | None = None,
    ):
        self.lock = lock  # trainer/run_lock.py's key: released when the run closes
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.first_row: dict = {}  # facts of the run (e.g. kernels chosen) for the first row
        self.wandb_run = None
        self.bar = None
        self.write_failed = False
        if not enabled:
            return
        self._truncate(start_step)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the run
        progress = logging_cfg.progress
        if progress == "bar" or (progress == "auto" and _bar_fits()):
            from tqdm import tqdm

            self.bar = tqdm(
                total=max_steps,
                initial=start_step,
                dynamic_ncols=True,
                desc="train",
                file=sys.stderr,
            )
        if wandb_init is not None:
            import wandb

            # wandb records the command line (its run metadata): mask secrets there too.
            argv, sys.argv = sys.argv, scrub(sys.argv)
            try:
                self.wandb_run = wandb.init(**scrub(wandb_init))
            finally:
                sys.argv = argv

    def _truncate(self, start_step: int) -> None:
        """Keep the rows up to the resumed step: rewritten under a temporary name and renamed
        over the file (a kill meanwhile leaves the old file whole). A line cut short (a crash,
        a full disk) is dropped, and said."""
        if not self.path.exists():
            return
        if start_step == 0:
            self.path.unlink()
            return
        kept, cut = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                cut.append(number)
        if cut:
            log.warning(
                "%s: %d line(s) that are not whole JSON rows dropped (line %s): a row cut "
                "short by a crash or a full disk; its step is missing from the metrics",
                self.path,
                len(cut),
                ", ".join(map(str, cut[:5])),
            )
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def _write(self, record: dict) -> None:
        """One row; a failed write (a full disk) is said once and training goes on: losing
        rows costs less than losing the steps since the last checkpoint."""
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as exc:
            if not self.write_failed:
                log.error(
                    "%s: cannot write the row of step %s (%s): training goes on, its rows are "
                    "missing until a write succeeds",
                    self.path,
                    record.get("step"),
                    exc.strerror or exc,
                )
            self.write_failed = True
            return
        if self.write_failed:
            log.warning("%s: rows are written again from step %s", self.path, record.get("step"))
            self.write_failed = False

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        metrics = scrub(metrics)
        facts, self.first_row = self.first_row, {}
        record = {**{k: _clean(v) for k, v in metrics.items()}, **facts}
        self._write(record)
        if self.wandb_run is not None:
            self._to_wandb(metrics, facts)
        short = (
            f"step {metrics['step']} loss {metrics['loss']:.4f} "
            f"text {loss_text(metrics['loss_text'])} image {loss_text(metrics['loss_image'])} "
            f"lr {metrics['lr']:.2e} gnorm {metrics['grad_norm']:.3f} "
            f"tok/s {metrics.get('tokens_per_s_interval', metrics['tokens_per_s']):.0f}"
            + (f" eval {metrics['eval/loss']:.4f}" if metrics.get("eval/loss") is not None else "")
        )
        if self.bar is not None:
            self.bar.update(metrics["step"] - self.bar.n)
            self.bar.set_postfix_str(short.split(" ", 2)[2])
        else:
            log.info(short)

    def _to_wandb(self, metrics: dict, facts: dict) -> None:
        """The row to wandb; a wandb that fails (its service process killed, by the OOM killer
        or a crash of its own) is said once and dropped: training and metrics.jsonl go on, as
        for a row that cannot be written."""
        try:
            if facts:
                self.wandb_run.config.update(facts, allow_val_change=True)
            self.wandb_run.log(metrics, step=metrics["step"])
        except Exception as exc:  # noqa: BLE001 - any failure of an auxiliary logger
            log.error(
                "wandb stopped at step %s (%s: %s): training goes on without it; %s keeps "
                "every row",
                metrics.get("step"),
                type(exc).__name__,
                exc,
                self.path,
            )
            self.wandb_run = None

    def close(self) -> None:
        run_lock.release(self.lock)
        self.lock = None
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as exc:  # noqa: BLE001 - the run's end must not fail on it
                log.error("wandb could not finish (%s: %s)", type(exc).__name__, exc)


def _bar_fits() -> bool:
    """A terminal that shows a bar: a pseudo-terminal that reports no width (some CI and
    `docker exec -t` ttys) would draw it 0 wide, and the bar replaces the step lines."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:
        return False


def loss_text(loss: float, digits: int = 4) -> str:
    """A modality's loss for the log: `-` on a step without its tokens (the loss is NaN
    there, null in metrics.jsonl), not a `nan` that reads as a diverged run."""
    return "-" if math.isnan(loss) else f"{loss:.{digits}f}"
