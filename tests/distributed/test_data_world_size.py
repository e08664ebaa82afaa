"""Through the training loop: webdataset batches do not depend on the world size, and a
checkpoint written by 2 ranks resumes on 1 with exactly the next 8 batches (same losses and the
same data counters as an uninterrupted single-process run)."""

from __future__ import annotations

import pytest

from tests.data_shards import (
    interleaved,
    pairs,
    texts,
    user_config_dir,
    with_config_dir,
    write_shards,
)
from tests.helpers import metrics, train

STEPS, SAVE_AT, REL_TOL = 12, 4, 1e-5


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    p = write_shards(root / "pairs", pairs(12), 3)
    t = write_shards(root / "text", texts(10), 5)
    il = write_shards(root / "il", interleaved(4), 2)
    body = f"""seq_len: 48
num_streams: 4
num_workers: 1
sources:
  - {{urls: "{p}", format: pairs, weight: 2}}
  - {{urls: "{t}", format: text, weight: 1}}
  - {{urls: "{il}", format: interleaved, weight: 1}}
"""
    return user_config_dir(root / "conf", "shards", body)


def _run(run_dir, config_dir, *overrides, nproc=1):
    train(run_dir, "data=shards", *overrides, launcher=with_config_dir(config_dir, nproc))
    return {r["step"]: r for r in metrics(run_dir)}


def test_two_ranks_then_resume_on_one_equals_one_rank(tmp_path, config_dir):
    straight = _run(
        tmp_path / "one", config_dir, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2"
    )
    run_dir = tmp_path / "two_then_one"
    two = _run(
        run_dir,
        config_dir,
        f"trainer.max_steps={SAVE_AT}",
        "trainer.micro_batch_size=2",
        f"checkpoint.interval={SAVE_AT}",
        nproc=2,
    )
    resumed = _run(
        run_dir,
        config_dir,
        f"trainer.max_steps={STEPS}",
        "trainer.micro_batch_size=4",
        "checkpoint.resume=auto",
    )
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        got = two[step] if step <= SAVE_AT else resumed[step]
        want = straight[step]
        rel = abs(got["loss"] - want["loss"]) / abs(want["loss"])
        assert rel <= REL_TOL, (step, got["loss"], want["loss"])
        # The batches themselves: same loss-bearing tokens per modality, same data counters.
        same = ["tokens_text", "tokens_image"] + [k for k in want if k.startswith("data/")]
        assert {k: got[k] for k in same} == {k: want[k] for k in same}, step
    assert straight[STEPS]["data/documents"] > 0
