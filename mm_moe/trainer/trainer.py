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

from mm_moe.data.batch import TokenProfile
from mm_moe.modality import NUM_MODALITIES
from mm_moe.parallel.distributed import all_reduce_sum_to_host, names_lost_ranks
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
    raw_sigmoid_gates,
    summary,
)
from mm_moe.trainer.host_memory import peak_memory
from mm_moe.trainer.profiler import ProfileHook
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
    if cfg.moe.enabled and warning.intervals > 0:
        hooks.append(RoutingHealthHook(warning, sigmoid_gates=raw_sigmoid_gates(cfg.moe)))
    hooks += [RollbackHook(), CheckpointHook()]
    if cfg.trainer.profile:  # trainer.profile=START:END (profiler.py)
        hooks.append(ProfileHook(*cfg.trainer.profile_steps()))
    # Last: sets up the next step (statistics only in the forwards of logged steps).
    hooks.append(HealthStatsHook(health=cfg.moe.enabled and cfg.moe.health_stats))
    return hooks


def data_counters(loader, device: torch.device, extra: dict | None = None) -> dict[str, int]:
    """The loader's running counters (e.g. `data/skipped_<reason>`), and `extra`, summed over
    ranks in one all-reduce; loaders expose `counters() -> dict[str, int]` with the same keys
    on every rank. One copy to the host for all of them."""
    local = loader.counters() if hasattr(loader, "counters") else {}
    summed = all_reduce_sum_to_host({**local, **(extra or {})}, device)
    return {k: int(v[0]) for k, v in summed.items()}


_PROFILE = "_profile/"


def _profile_counts(batches: list) -> dict[str, int]:
    """This rank's TokenProfile (data/batch.py) as counters to sum over ranks; empty where a
    batch has none."""
    if not batches or any(b.profile is None for b in batches):
        return {}
    p = sum((b.profile for b in batches[1:]), batches[0].profile)
    counts = {f"{_PROFILE}tokens_{m}": n for m, n in enumerate(p.tokens_M)}
    counts.update(
        {f"{_PROFILE}{k}": getattr(p, k) for k in ("positions", "causal_keys", "document_keys")}
    )
    return counts


def _global_profile(counters: dict[str, int]) -> TokenProfile | None:
    """The global batch's TokenProfile, taken out of the summed counters."""
    mine = {k[len(_PROFILE) :]: counters.pop(k) for k in list(counters) if k.startswith(_PROFILE)}
    if not mine:
        return None
    tokens_M = tuple(mine[f"tokens_{m}"] for m in range(NUM_MODALITIES))
    return TokenProfile(tokens_M, mine["positions"], mine["causal_keys"], mine["document_keys"])


class Trainer:
    def __init__(self, training: Training, hooks: list[Hook] | None = None):
        self.training = training
        self.hooks = default_hooks(training) if hooks is None else hooks
        self.stop = False  # a hook may end the run after the current step
        self.history: list[dict] = []

    def _record(self, step: int, stats: dict, lr: float, seconds: float, batches) -> dict:
        t = self.training
        padded = t.cfg.trainer.global_batch_size * t.cfg.data.seq_len
        counters = data_counters(t.loader, t.dist.device, _profile_counts(batches))
        profile = _global_profile(counters)
        record = {
            "step": step,
            **stats,
            "lr": lr,
            "step_time_s": seconds,
            # Tokens the model learns from, padding left out; every position beside it.
            "tokens_per_s": (profile.tokens if profile else padded) / seconds,
            "tokens_per_s_padded": padded / seconds,
        }
        record.update(counters)
        record.update(peak_memory(t.dist.device))
        record.update(t.guard.counters(), **t.checkpointer.counters())
        record.update(t.flops.update(stats, profile))
        if t.peak_flops and "flops_step" in record:
            record["mfu"] = record["flops_step"] / seconds / (t.peak_flops * t.dist.world_size)
        return record

    def step(self, step: int) -> dict:
        """One optimizer step and its metrics record (before the hooks)."""
        t = self.training
        t0 = time.perf_counter()
        lr = t.engine.lr_scheduler.get_last_lr()[0]
        batches = t.loader.next()  # built while the last step ran (data/prefetch.py)
        stats = train_step(
            t.engine,
            batches,
            t.model_cfg.z_loss,
            t.dist.world_size,
            t.dist.device,
            guard=t.guard,
            step=step,
        )
        if t.dist.device.type == "cuda":
            torch.cuda.synchronize()
        return self._record(step, stats, lr, time.perf_counter() - t0, batches)

    def fit(self) -> list[dict]:
        """Train to trainer.max_steps; returns the metrics records (rank 0's view, the same on
        every rank)."""
        t = self.training
        t.metrics.first_row = dict(t.facts)
        for hook in self.hooks:
            hook.before_fit(self)
        try:
            for step in range(t.start_step + 1, t.cfg.trainer.max_steps + 1):
                record = self.step(step)
                self.history.append(record)
                for hook in self.hooks:
                    hook.after_step(self, step, record)
                if self.stop:
                    break
        finally:  # local (not collective): the prefetch thread and data workers stop
            if hasattr(t.loader, "close"):
                t.loader.close()
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
