"""What runs after each training step, in order: held-out evaluation, metrics, rollback after
a loss spike, checkpoints (at the interval, and on preemption, which then ends the run)."""

from __future__ import annotations

import logging
import math

from mm_moe.checkpoint import layout
from mm_moe.modality import MODALITIES
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.distributed import all_reduce_sum
from mm_moe.trainer.metrics import loss_text
from mm_moe.trainer.preemption import PreemptionFlag
from mm_moe.trainer.rollback import rollback

log = logging.getLogger("mm_moe")


class Hook:
    def before_fit(self, trainer) -> None:
        pass

    def after_step(self, trainer, step: int, record: dict) -> None:
        pass

    def after_fit(self, trainer) -> None:
        pass


def _last(trainer, step: int) -> bool:
    return step == trainer.training.cfg.trainer.max_steps


class EvalHook(Hook):
    """Held-out loss every `interval` steps and at the last one (every rank: collective)."""

    def __init__(self, evaluator, interval: int):
        self.evaluator, self.interval = evaluator, interval
        self.warned = False

    def after_step(self, trainer, step: int, record: dict) -> None:
        if step % self.interval == 0 or _last(trainer, step):
            scores = self.evaluator(trainer.training.engine.module)
            record.update(scores)
            record["evaluated"] = True  # MetricsHook logs this step, whatever its interval
            missing = [m for m in MODALITIES if scores.get(f"eval/tokens_{m}", 1) == 0]
            if missing and not self.warned and trainer.training.dist.is_main:
                self.warned = True  # the same batches at every evaluation: said once
                formats = {s.format for s in trainer.training.cfg.eval.sources}
                why = (
                    "eval.sources are text only (format: text)"
                    if formats == {"text"}
                    else "a source's documents fill whole micro-batches (long text documents "
                    "do): raise eval.num_batches, or give eval.sources a source with them"
                )
                log.warning(
                    "the held-out batches hold no %s tokens: eval/loss_%s is not computed; %s",
                    " or ".join(missing),
                    missing[0],
                    why,
                )


class MetricsHook(Hook):
    """metrics.jsonl, wandb and the console, every trainer.log_interval steps (and at the
    last step and after an evaluation). A logged record also carries the training loss over
    every step since the previous logged one (in this process), weighted by loss tokens:
    `loss_interval`, `loss_<m>_interval` and `steps_interval`, less noisy than one step's;
    and the throughput over those steps, `tokens_per_s_interval` (their tokens over their
    time: one step's rate says little when step times vary)."""

    def __init__(self):
        self._sums: dict[str, list[float]] = {}  # name: [value x weight, weight]
        self._steps = 0

    def _add(self, record: dict) -> None:
        self._steps += 1
        # Losses weighted by their tokens, the throughput by its steps' time.
        pairs = [("loss", "tokens_loss"), ("tokens_per_s", "step_time_s")]
        pairs += [(f"loss_{m}", f"tokens_{m}") for m in MODALITIES]
        for loss, tokens in pairs:
            value, count = record.get(loss), record.get(tokens, 0)
            if value is None or not count or not math.isfinite(value):
                continue
            acc = self._sums.setdefault(loss, [0.0, 0.0])
            acc[0] += value * count
            acc[1] += count

    def after_step(self, trainer, step: int, record: dict) -> None:
        evaluated = record.pop("evaluated", False)
        self._add(record)
        if (
            evaluated
            or step % trainer.training.cfg.trainer.log_interval == 0
            or _last(trainer, step)
        ):
            for loss, (total, count) in self._sums.items():
                record[f"{loss}_interval"] = total / count
            record["steps_interval"] = self._steps
            self._sums, self._steps = {}, 0
            trainer.training.metrics.log(record)


class RouterNoiseHook(Hook):
    """moe.router_noise_anneal_steps: the router noise decays linearly to 0; each step runs
    with router_noise x max(0, 1 - (step - 1) / anneal_steps), logged as moe/router_noise."""

    def _set(self, trainer, step: int) -> float:
        t = trainer.training
        scale = max(0.0, 1.0 - step / t.cfg.moe.router_noise_anneal_steps)
        for module in t.engine.module.modules():
            if isinstance(module, MoELayer):
                module.noise_scale = scale
        return t.cfg.moe.router_noise * scale

    def before_fit(self, trainer) -> None:
        self.noise = self._set(trainer, trainer.training.start_step)

    def after_step(self, trainer, step: int, record: dict) -> None:
        record["moe/router_noise"] = self.noise
        self.noise = self._set(trainer, step)


class HealthStatsHook(Hook):
    """Routing statistics (expert loads, aux-router accuracy, mixture-of-depths selection; with
    `health`, moe.health_stats, the routing-health statistics too) are computed in the
    forwards of the steps that log them (every trainer.log_interval and the last), not in
    every step: the model's `collect_stats` flag, and each MoE layer's `collect_health`."""

    def __init__(self, health: bool = True):
        self.health = health

    def _set(self, trainer, step: int) -> None:
        t = trainer.training
        logged = step % t.cfg.trainer.log_interval == 0 or step == t.cfg.trainer.max_steps
        for module in t.engine.module.modules():
            if isinstance(module, MoELayer) and self.health:
                module.collect_health = logged
            if hasattr(module, "collect_stats"):
                module.collect_stats = logged

    def before_fit(self, trainer) -> None:
        self._set(trainer, trainer.training.start_step + 1)

    def after_step(self, trainer, step: int, record: dict) -> None:
        self._set(trainer, step + 1)


REMEDIES = (
    "moe.expert_choice_gate=normalized, moe.router_init=orthogonal, moe.router_lr_scale<1, "
    "moe.router_noise with moe.router_noise_anneal_steps, moe.router_logits=cosine, or "
    "moe.router=token_choice (dropless); docs/model.md#routing-health"
)


def raw_sigmoid_gates(moe) -> bool:
    """Whether the selected pairs' gates are their sigmoid scores as they are: then a low mean
    gate means a router that silences its experts. Softmax gates shrink with the number of
    experts by design, and normalized ones (renormalized token choice, normalized expert
    choice) average 1/k."""
    if moe.router == "token_choice":
        normalized = moe.renormalize
    else:
        normalized = moe.expert_choice_gate == "normalized"
    return moe.score == "sigmoid" and not normalized


class RoutingHealthHook(Hook):
    """A warning, once per layer and group, when a group's routing degenerates over
    logging.routing_warning.intervals consecutive logged steps (moe/health.py's metrics;
    without moe.health_stats, the share of tokens no expert took alone, from `dropped`)."""

    def __init__(self, cfg, sigmoid_gates: bool):
        self.cfg, self.sigmoid_gates = cfg, sigmoid_gates  # raw_sigmoid_gates(moe)
        self.streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def after_step(self, trainer, step: int, record: dict) -> None:
        t = trainer.training
        if step % t.cfg.trainer.log_interval or not t.dist.is_main:
            return
        for key, dropped in record.items():
            if not (key.startswith("moe/l") and key.endswith("/dropped")):
                continue
            group = key.removesuffix("/dropped")
            unprocessed = record.get(f"{group}/taken_0", dropped)
            gate = record.get(f"{group}/gate_mean", 1.0)
            bad = unprocessed > self.cfg.unprocessed or (
                self.sigmoid_gates and gate < self.cfg.gate_mean
            )
            self.streak[group] = self.streak.get(group, 0) + 1 if bad else 0
            if self.streak[group] >= self.cfg.intervals and group not in self.warned:
                self.warned.add(group)
                _, layer, name = group.split("/")
                log.warning(
                    "routing of layer %s, group %s degenerates: %.0f%% of its tokens processed "
                    "by no expert, mean gate %.2f, router rows' mean cosine %.2f, selection "
                    "overlap %.2f (step %d, %d logged steps in a row). Remedies: %s",
                    layer.removeprefix("l"),
                    name,
                    100 * unprocessed,
                    gate,
                    record.get(f"{group}/router_cosine", float("nan")),
                    record.get(f"{group}/jaccard", float("nan")),
                    step,
                    self.streak[group],
                    REMEDIES,
                )


class RollbackHook(Hook):
    """A loss spike under trainer.spike.action=rollback: back to the last checkpoint."""

    def after_step(self, trainer, step: int, record: dict) -> None:
        t = trainer.training
        if t.guard.last_action == "rollback":
            rollback(
                t.guard, t.checkpointer, step, t.engine, t.loader, t.dist.rank, t.dist.world_size
            )


class CheckpointHook(Hook):
    """A checkpoint every checkpoint.interval steps and at the last one; SIGTERM, SIGUSR1 or
    SIGUSR2 on any rank (agreed by one all-reduce a step) saves at once and ends the run."""

    def before_fit(self, trainer) -> None:
        self.preemption = PreemptionFlag()

    def after_step(self, trainer, step: int, record: dict) -> None:
        t = trainer.training
        interval = t.cfg.checkpoint.interval
        preempted = self.preemption.agreed(all_reduce_sum, t.dist.device)
        if preempted or (interval and (step % interval == 0 or _last(trainer, step))):
            t.checkpointer.save(t.state(step))
        if preempted:
            log.warning(
                "%s received: checkpoint of step %d written, exiting",
                self.preemption.signal_name or "a preemption signal on another rank",
                step,
            )
            trainer.stop = True

    def after_fit(self, trainer) -> None:
        self.preemption.restore()


def summary(history: list[dict], training) -> None:
    first, last = history[0], history[-1]
    # Tokens over time (a mean of the steps' rates over-weights the fast steps).
    seconds = sum(r["step_time_s"] for r in history)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in history)
    tok_s = tokens / max(seconds, 1e-9)
    evals = [r for r in history if r.get("eval/loss") is not None]
    cfg = training.cfg
    trained = (
        f"{len(history)} steps ({first['step']}-{last['step']}, resumed from step "
        f"{first['step'] - 1})"
        if first["step"] > 1
        else f"{last['step']} steps"
    )
    losses = ", ".join(
        f"{m} {loss_text(first[f'loss_{m}'], 3)} -> {loss_text(last[f'loss_{m}'], 3)}"
        for m in ("text", "image")
    )
    lines = [
        f"done: {trained}; loss {first['loss']:.3f} -> {last['loss']:.3f} ({losses}); "
        + (
            f"held-out loss {evals[-1]['eval/loss']:.3f} at step {evals[-1]['step']}; "
            if evals
            else ""
        )
        + f"{tokens:,.0f} tokens in {seconds:.1f} s of steps (evaluations and saves "
        f"apart), {tok_s:.0f} tokens/s",
        f"metrics: {training.metrics.path}",
    ]
    root = training.checkpointer.root
    latest = layout.latest_step_dir(root)
    if cfg.checkpoint.interval or latest is not None:  # a preemption's save included
        lines.append(f"checkpoints: {root} (latest: {latest})")
    else:
        lines.append(
            "no checkpoint written: checkpoint.interval=0 (N saves every N steps and the last)"
        )
    failed = write_errors_line(last, training.checkpointer.write_errors)
    if cfg.logging.wandb.mode != "disabled":
        lines.append(f"wandb ({cfg.logging.wandb.mode}): {cfg.trainer.run_dir}/wandb")
    for line in lines:
        log.info(line)
    if failed:
        log.warning(failed)


def write_errors_line(last_row: dict, write_errors: int) -> str | None:
    """The checkpoint writes that failed (checkpoint.on_write_error=continue), with those the
    metrics' last row cannot count: an asynchronous write fails after its step's row, the last
    one at the end of the run."""
    if not write_errors:
        return None
    unlogged = write_errors - int(last_row.get("checkpoint/write_errors") or 0)
    later = f" ({unlogged} after the last metrics row)" if unlogged > 0 else ""
    return f"checkpoint writes that failed: {write_errors}{later}"
