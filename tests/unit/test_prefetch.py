"""The next step's batches are built while the step runs (data/prefetch.py), and a checkpoint
still holds the position of the batches taken, not of those fetched ahead."""

from __future__ import annotations

import time

import torch

from mm_moe.data.config import DataConfig
from mm_moe.data.prefetch import Prefetcher


def _loader():
    return DataConfig(seq_len=16).build(
        seed=3, rank=0, dp_world_size=1, micro_batch_size=2, global_batch_size=4
    )


class _SlowLoader:
    """A loader whose next() takes `seconds` (decoding, tokenizing, packing)."""

    prefetch_safe = True

    def __init__(self, seconds: float):
        self.inner, self.seconds = _loader(), seconds

    def next(self):
        time.sleep(self.seconds)
        return self.inner.next()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _loop(loader, steps: int, step_s: float) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loader.next()
        time.sleep(step_s)  # the training step (the GPU's time; the host is free)
    return time.perf_counter() - t0


def test_step_loop_takes_the_max_of_step_and_load_not_their_sum():
    steps, load_s, step_s = 6, 0.15, 0.15
    serial = _loop(_SlowLoader(load_s), steps, step_s)
    prefetched = Prefetcher(_SlowLoader(load_s))
    overlapped = _loop(prefetched, steps, step_s)
    prefetched.close()
    assert serial >= steps * (load_s + step_s)
    # max(step, load) per step, plus the first load that nothing hides
    assert overlapped < steps * max(load_s, step_s) + load_s + 0.25, (overlapped, serial)
    assert overlapped < 0.75 * serial


def test_checkpoint_position_is_that_of_the_batches_taken():
    plain, ahead = _loader(), Prefetcher(_loader())
    for _ in range(3):
        want, got = plain.next(), ahead.next()
        for a, b in zip(want, got):
            assert torch.equal(a.input_ids_BS, b.input_ids_BS)
    time.sleep(0.05)  # the thread has fetched the next step by now
    assert ahead.loader.state_dict() != plain.state_dict()  # the loader itself is ahead
    assert ahead.state_dict() == plain.state_dict() and plain.state_dict()["step"] == 3
    # A resume (or a rollback) from that position serves the same batches as the plain loader.
    resumed = Prefetcher(_loader())
    resumed.next()
    resumed.load_state_dict(ahead.state_dict())
    for _ in range(2):
        for a, b in zip(plain.next(), resumed.next()):
            assert torch.equal(a.input_ids_BS, b.input_ids_BS)
    for p in (ahead, resumed):
        p.close()


def test_a_collective_loader_is_read_on_the_calling_thread():
    class Collective(_SlowLoader):
        prefetch_safe = False

    loader = Prefetcher(Collective(0.0))
    loader.next()
    assert loader._thread is None and loader.state_dict()["step"] == 1


def test_pinned_only_when_asked():
    batches = Prefetcher(_loader(), pin_memory=False).next()
    assert not batches[0].input_ids_BS.is_pinned()
    assert batches[0].profile is not None  # host-side counts travel with the batch


def test_the_trainers_step_loop_overlaps_loading_with_the_step(tmp_path, monkeypatch):
    """Trainer.fit as built by build_training: a loader slowed to `load_s` per step and a step
    of `step_s` take about max(step_s, load_s) per step, not their sum."""
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.trainer import trainer as trainer_mod
    from mm_moe.trainer.build import build_training

    steps, load_s, step_s = 6, 0.2, 0.2
    cfg = from_dict(
        TrainConfig,
        {
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
            "data": {"seq_len": 16},
            "trainer": {"global_batch_size": 2, "max_steps": steps, "run_dir": str(tmp_path)},
            "checkpoint": {"interval": 0},
            "eval": {"interval": 0},
            "logging": {"wandb": {"mode": "disabled"}},
        },
    )
    training = build_training(cfg)
    assert isinstance(training.loader, Prefetcher) and training.loader.threaded
    inner = training.loader.loader
    real_next = inner.next

    def slow_next():
        time.sleep(load_s)
        return real_next()

    def step(engine, batches, *args, **kwargs):
        time.sleep(step_s)  # the GPU's share: the host is free meanwhile
        stats = {"loss": 1.0, "loss_text": 1.0, "loss_image": 1.0, "grad_norm": 0.0}
        return {**stats, "tokens_loss": 1, "tokens_text": 1, "tokens_image": 0}

    monkeypatch.setattr(inner, "next", slow_next)
    monkeypatch.setattr(trainer_mod, "train_step", step)
    t0 = time.perf_counter()
    history = trainer_mod.Trainer(training, hooks=[]).fit()
    elapsed = time.perf_counter() - t0
    assert len(history) == steps
    assert elapsed < steps * (load_s + step_s) * 0.75, elapsed  # not the sum
    assert elapsed > steps * max(load_s, step_s)


def test_a_wait_on_a_dead_worker_ends_with_a_message(monkeypatch):
    """A data worker killed mid-message left the loader's read blocked for good, and a
    1-process run hung without a word: the wait now looks at the workers' liveness."""
    import threading

    import pytest

    from mm_moe.data import prefetch
    from mm_moe.data.defects import DataError

    monkeypatch.setattr(prefetch, "WATCH_S", 0.05)
    blocked = threading.Event()

    class Stuck:
        prefetch_safe = True
        dead = []

        def next(self):
            blocked.wait()  # a read that never returns

        def state_dict(self):
            return {}

        def dead_workers(self):
            return self.dead

    loader = Stuck()
    fetcher = Prefetcher(loader)
    fetcher._start()
    threading.Timer(0.3, lambda: loader.dead.append(4242)).start()
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"a data worker stopped \(pid\(s\) 4242 died"):
        fetcher.next()
    assert time.perf_counter() - start < 5
    blocked.set()
