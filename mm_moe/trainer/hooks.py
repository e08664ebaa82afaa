"""What runs after each training step, in order: held-out evaluation, metrics, rollback after
a loss spike, checkpoints (at the interval, and on preemption, which then ends the run)."""

from __future__ import annotations

import logging

from mm_moe.checkpoint import layout
from mm_moe.parallel.distributed import all_reduce_sum
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

    def after_step(self, trainer, step: int, record: dict) -> None:
        if step % self.interval == 0 or _last(trainer, step):
            record.update(self.evaluator(trainer.training.engine.module))


class MetricsHook(Hook):
    """metrics.jsonl, wandb and the console, every trainer.log_interval steps (and at the
    last step and after an evaluation)."""

    def after_step(self, trainer, step: int, record: dict) -> None:
        evaluated = record.pop("evaluated", False)
        if (
            evaluated
            or step % trainer.training.cfg.trainer.log_interval == 0
            or _last(trainer, step)
        ):
            trainer.training.metrics.log(record)


class RollbackHook(Hook):
    """A loss spike under trainer.spike.action=rollback: back to the last checkpoint."""

    def after_step(self, trainer, step: int, record: dict) -> None:
        t = trainer.training
        if t.guard.last_action == "rollback":
            rollback(
                t.guard, t.checkpointer, step, t.engine, t.loader, t.dist.rank, t.dist.world_size
            )


class CheckpointHook(Hook):
    """A checkpoint every checkpoint.interval steps and at the last one; SIGTERM or SIGUSR1
    on any rank (agreed by one all-reduce a step) saves at once and ends the run."""

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
        self.preemption.restore_defaults()


def summary(history: list[dict], training) -> None:
    first, last = history[0], history[-1]
    tok_s = sum(r["tokens_per_s"] for r in history) / len(history)
    cfg = training.cfg
    lines = [
        f"done: {last['step']} steps; loss {first['loss']:.3f} -> {last['loss']:.3f} "
        f"(text {first['loss_text']:.3f} -> {last['loss_text']:.3f}, "
        f"image {first['loss_image']:.3f} -> {last['loss_image']:.3f}); {tok_s:.0f} tokens/s",
        f"metrics: {training.metrics.path}",
    ]
    if cfg.checkpoint.interval:
        root = training.checkpointer.root
        lines.append(f"checkpoints: {root} (latest: {layout.latest_step_dir(root)})")
    else:
        lines.append(
            "no checkpoint written: checkpoint.interval=0 (N saves every N steps and the last)"
        )
    if cfg.logging.wandb.mode != "disabled":
        lines.append(f"wandb ({cfg.logging.wandb.mode}): {cfg.trainer.run_dir}/wandb")
    for line in lines:
        log.info(line)
