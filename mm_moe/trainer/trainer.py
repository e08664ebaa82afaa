"""The training loop: each step calls `train_step`, then the hooks in order.

    Trainer(build_training(cfg)).fit()

Hooks (hooks.py) see the step's metrics record and the Training: held-out evaluation adds to
the record, metrics log it, rollback reloads a checkpoint after a loss spike, checkpointing
saves at the interval and on preemption (and then stops the run).
"""

from __future__ import annotations

import logging
import time

import torch

from mm_moe.parallel.distributed import all_reduce_sum_dict, names_lost_ranks
from mm_moe.trainer.build import Training, build_training
from mm_moe.trainer.hooks import (
    CheckpointHook,
    EvalHook,
    HealthStatsHook,
    Hook,
    MetricsHook,
    RollbackHook,
    RouterNoiseHook,
    RoutingHealthHook,
    summary,
)
from mm_moe.trainer.step import train_step

log = logging.getLogger("mm_moe")


def default_hooks(training: Training) -> list[Hook]:
    cfg = training.cfg
    hooks: list[Hook] = []
    if cfg.moe.router_noise > 0 and cfg.moe.router_noise_anneal_steps > 0:
        hooks.append(RouterNoiseHook())
    if training.evaluator is not None:
        hooks.append(EvalHook(training.evaluator, cfg.eval.interval))
    hooks.append(MetricsHook())
    warning = cfg.logging.routing_warning
    if cfg.moe.enabled and cfg.moe.health_stats and warning.intervals > 0:
        hooks.append(RoutingHealthHook(warning, sigmoid_gates=cfg.moe.score == "sigmoid"))
    hooks += [RollbackHook(), CheckpointHook()]
    if cfg.moe.enabled and cfg.moe.health_stats:
        hooks.append(HealthStatsHook())  # last: sets up the next step
    return hooks


def data_counters(loader, device: torch.device) -> dict[str, int]:
    """The loader's running counters (e.g. `data/skipped_<reason>`), summed over ranks;
    loaders expose `counters() -> dict[str, int]` with the same keys on every rank."""
    local = loader.counters() if hasattr(loader, "counters") else {}
    return {k: int(v) for k, v in all_reduce_sum_dict(local, device).items()}


class Trainer:
    def __init__(self, training: Training, hooks: list[Hook] | None = None):
        self.training = training
        self.hooks = default_hooks(training) if hooks is None else hooks
        self.stop = False  # a hook may end the run after the current step
        self.history: list[dict] = []

    def _record(self, step: int, stats: dict, lr: float, seconds: float) -> dict:
        t = self.training
        tokens_per_step = t.cfg.trainer.global_batch_size * t.cfg.data.seq_len
        record = {
            "step": step,
            **stats,
            "lr": lr,
            "step_time_s": seconds,
            "tokens_per_s": tokens_per_step / seconds,
        }
        record.update(data_counters(t.loader, t.dist.device))
        record.update(t.guard.counters(), **t.checkpointer.counters())
        record.update(t.flops.update(stats))
        if t.peak_flops:
            mean_flops = (record["flops_per_token_text"] + record["flops_per_token_image"]) / 2
            record["mfu"] = mean_flops * record["tokens_per_s"] / (t.peak_flops * t.dist.world_size)
        return record

    def step(self, step: int) -> dict:
        """One optimizer step and its metrics record (before the hooks)."""
        t = self.training
        t0 = time.perf_counter()
        lr = t.engine.lr_scheduler.get_last_lr()[0]
        stats = train_step(
            t.engine,
            t.loader.next(),
            t.model_cfg.z_loss,
            t.dist.world_size,
            t.dist.device,
            guard=t.guard,
            step=step,
        )
        if t.dist.device.type == "cuda":
            torch.cuda.synchronize()
        return self._record(step, stats, lr, time.perf_counter() - t0)

    def fit(self) -> list[dict]:
        """Train to trainer.max_steps; returns the metrics records (rank 0's view, the same on
        every rank)."""
        t = self.training
        t.metrics.first_row = dict(t.facts)
        for hook in self.hooks:
            hook.before_fit(self)
        for step in range(t.start_step + 1, t.cfg.trainer.max_steps + 1):
            record = self.step(step)
            self.history.append(record)
            for hook in self.hooks:
                hook.after_step(self, step, record)
            if self.stop:
                break
        # Collective (not in a `finally`: a rank that failed alone must not wait on the others)
        t.checkpointer.close()  # an asynchronous write in flight ends (and fails) here
        for hook in self.hooks:
            hook.after_fit(self)
        t.metrics.close()
        if t.dist.is_main and self.history:
            summary(self.history, t)
        return self.history


@names_lost_ranks
def run(cfg) -> list[dict]:
    """Build the run from a TrainConfig and train it."""
    return Trainer(build_training(cfg)).fit()
