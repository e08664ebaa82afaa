"""The trainer's hooks as Trainer.fit runs them: every held-out evaluation reaches the metrics,
whatever trainer.log_interval is (an evaluation between logged steps was computed and lost)."""

from __future__ import annotations

from types import SimpleNamespace

from mm_moe.trainer.hooks import EvalHook, MetricsHook


def test_every_evaluation_is_logged_between_log_intervals():
    logged = []
    cfg = SimpleNamespace(trainer=SimpleNamespace(log_interval=5, max_steps=12))
    metrics = SimpleNamespace(log=lambda record: logged.append(dict(record)))
    trainer = SimpleNamespace(
        training=SimpleNamespace(cfg=cfg, metrics=metrics, engine=SimpleNamespace(module=None))
    )
    calls = []
    evaluator = lambda module: calls.append(1) or {"eval/loss": float(len(calls))}  # noqa: E731
    hooks = [EvalHook(evaluator, interval=4), MetricsHook()]
    for step in range(1, 13):
        record = {"step": step, "loss": 1.0, "tokens_loss": 10}
        for hook in hooks:
            hook.after_step(trainer, step, record)
    evals = {r["step"]: r["eval/loss"] for r in logged if "eval/loss" in r}
    assert evals == {4: 1.0, 8: 2.0, 12: 3.0}
    assert sorted(r["step"] for r in logged) == [4, 5, 8, 10, 12]
    assert all("evaluated" not in r for r in logged)
