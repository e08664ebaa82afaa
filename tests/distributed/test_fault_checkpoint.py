"""Asynchronous checkpoints hold the state of the moment they were taken, and a failed write
names its path and leaves the previous checkpoint loadable (2 ranks, gloo, ZeRO-2, fp32)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.multiprocess import run_distributed


def _parts(zero_stage: int, root: Path):
    """A tiny dense run, built the way training builds it."""
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.trainer.build import build_training

    cfg = from_dict(
        TrainConfig,
        {
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
            "data": {"seq_len": 32},
            "trainer": {
                "global_batch_size": 4,
                "micro_batch_size": 1,
                "max_steps": 10,
                "run_dir": str(root),
            },
            "parallel": {"zero_stage": zero_stage},
            "logging": {"wandb": {"mode": "disabled"}},
        },
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    return build_training(cfg)


def _close(training) -> None:
    """What Trainer.fit closes at the end: the prefetch thread (a daemon thread left running
    torch ops while the process exits can abort it) and the checkpoint writer."""
    training.loader.close()
    training.checkpointer.close()
    training.metrics.close()


def _step(training):
    from mm_moe.trainer.step import train_step

    world = torch.distributed.get_world_size()
    train_step(training.engine, training.loader.next(), 0.0, world, torch.device("cpu"))


def _snapshot(engine) -> tuple[dict, dict]:
    from mm_moe.parallel import full_state

    return full_state.gather_model(engine), full_state.gather_optimizer(engine)


def _assert_saved(step_dir: Path, model: dict, optim: dict) -> None:
    saved_model = torch.load(step_dir / "model.pt", weights_only=True)
    saved_optim = torch.load(step_dir / "optimizer.pt", weights_only=True)
    assert saved_model.keys() == model.keys()
    for name, value in model.items():
        assert torch.equal(saved_model[name], value), name
    assert saved_optim["step"] == optim["step"]
    for name, moments in optim["moments"].items():
        for k, value in moments.items():
            assert torch.equal(saved_optim["moments"][name][k], value), (name, k)


def _check_async_save(rank: int, world: int, root: str) -> None:
    from mm_moe.checkpoint import layout, state
    from mm_moe.checkpoint.async_save import Checkpointer

    root = Path(root)
    training = _parts(zero_stage=2, root=root)
    engine, cfg = training.engine, training.cfg
    cfg.checkpoint.async_save = True
    _step(training)
    at_save = _snapshot(engine)

    real_write = state.write

    def slow_write(*args, **kwargs):  # a slow disk: the write outlasts the next step
        time.sleep(1.5)
        return real_write(*args, **kwargs)

    state.write = slow_write
    checkpointer = Checkpointer(cfg.checkpoint, torch.device("cpu"))
    t0 = time.perf_counter()
    checkpointer.save(training.state(1))
    blocked = time.perf_counter() - t0
    assert blocked < 1.0, blocked  # training went on while the write was in flight
    ckpts = checkpointer.root
    assert not (ckpts / "step_00000001").exists()
    _step(training)  # parameters and moments change at once
    after = _snapshot(engine)
    checkpointer.wait()
    state.write = real_write
    if rank == 0:
        assert layout.latest_step_dir(ckpts) == ckpts / "step_00000001"
        _assert_saved(ckpts / "step_00000001", *at_save)
        assert not torch.equal(after[0]["norm.weight"], at_save[0]["norm.weight"])
    _close(training)


def _check_write_error(rank: int, world: int, root: str) -> None:
    from mm_moe.checkpoint import layout
    from mm_moe.checkpoint import state as ckpt_state
    from mm_moe.checkpoint.async_save import Checkpointer, CheckpointWriteError
    from mm_moe.trainer.fault_injection import _failing_writes
    from mm_moe.utils.faults import FaultInjector, parse

    training = _parts(zero_stage=2, root=Path(root))
    engine, cfg, loader = training.engine, training.cfg, training.loader
    fail_step_2 = FaultInjector(parse("write_error:step=2"))
    for async_save in (False, True):
        cfg.checkpoint.async_save = async_save
        checkpointer = Checkpointer(cfg.checkpoint, torch.device("cpu"))
        root = checkpointer.root
        checkpointer.save_file = _failing_writes(checkpointer.save_file, fail_step_2)
        _step(training)
        good = _snapshot(engine)
        checkpointer.save(training.state(1))
        _step(training)
        with pytest.raises(CheckpointWriteError) as err:
            checkpointer.save(training.state(2))
            checkpointer.wait()  # an asynchronous write's error shows at the next save/at exit
        if rank == 0:
            message = str(err.value)
            assert "No space left on device" in message, message
            assert str(root / ".tmp-step_00000002" / "model.pt") in message, message
            assert "step_00000001 is intact" in message, message
        assert layout.latest_step_dir(root) == root / "step_00000001"
        assert not (root / ".tmp-step_00000002").exists()
    # The previous checkpoint loads, with the state it was saved with.
    ckpt_state.load(root / "step_00000001", engine, loader, rank, world)
    loaded = _snapshot(engine)
    for name, value in good[0].items():
        assert torch.equal(loaded[0][name], value), name

    # on_write_error=continue: counted, logged, training goes on.
    cfg.checkpoint.on_write_error = "continue"
    checkpointer = Checkpointer(cfg.checkpoint, torch.device("cpu"))
    checkpointer.save_file = _failing_writes(checkpointer.save_file, fail_step_2)
    checkpointer.save(training.state(2))
    checkpointer.wait()
    assert checkpointer.counters() == {"checkpoint/write_errors": 1}
    _step(training)
    checkpointer.save(training.state(3))
    checkpointer.wait()
    assert layout.latest_step_dir(root) == root / "step_00000003"
    _close(training)


def _check_both(rank: int, world: int, root: str) -> None:
    _check_async_save(rank, world, f"{root}/async")
    _check_write_error(rank, world, f"{root}/write_error")


def test_async_save_holds_save_time_state_and_failed_write_keeps_previous(tmp_path):
    """One pair of processes for both checks: starting DeepSpeed is most of the cost."""
    run_distributed(_check_both, str(tmp_path), world_size=2)


def _rollback_with_listings_that_differ(rank: int, world: int, root: str, out: str) -> None:
    """Rank 1 lists an older newest step (a per-node listing cache): both load rank 0's."""
    from types import SimpleNamespace

    from mm_moe.checkpoint import layout
    from mm_moe.trainer import rollback

    listed = {0: [4, 8], 1: [4]}[rank]
    layout.complete_steps = lambda root: listed  # this process's view only
    loaded = []
    rollback.ckpt_state.load = lambda target, *args: loaded.append(Path(target).name)
    guard = SimpleNamespace(counts={"rollbacks": 0, "skipped_steps": 0})
    checkpointer = SimpleNamespace(root=Path(root), wait=lambda: None)
    engine = SimpleNamespace(global_steps=0)
    got = rollback.rollback(guard, checkpointer, 10, engine, None, rank, world)
    Path(out, f"rank{rank}").write_text(f"{got} {loaded}")


def test_a_rollback_loads_the_step_rank_0_lists_on_every_rank(tmp_path):
    """Each rank used to pick the step from its own directory listing: on a file system that
    caches listings per node (NFS) ranks could load different steps, or one skip the load and
    leave the others waiting in its collectives."""
    run_distributed(_rollback_with_listings_that_differ, str(tmp_path), str(tmp_path))
    said = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert said == ["8 ['step_00000008']"] * 2
