"""Expert parallelism through the real entry point: EP=2 on 2 ranks and EP=4 on 4 ranks give
the losses and grad norms of 1 rank with gradient accumulation over the same global batch, and
checkpoints move between (world size, EP size) pairs and continue with the same losses.

Runs are shared between tests (module fixtures): starting processes dominates their cost.

Expert-choice selection is discontinuous: EP sums expert gradients in another order than one
rank accumulating micro-batches (float noise ~1e-7), and Adam can magnify that noise in
coordinates whose gradient is near zero until a near-tie in some expert's top-C flips and the
runs part by ~1e-4. A modest learning rate and an Adam eps of 1e-4 (which stops Adam from
blowing float noise in near-zero gradient coordinates up to full-size updates) keep 10 steps
clear of that; with eps 1e-6 the chunked loss's other rounding flipped a tie at step 4 (grad
norms 8e-5 apart, then 1e-7 again with eps 1e-4). The runs themselves are deterministic.
"""

from __future__ import annotations

import pytest

from tests.helpers import metrics, train

REL_TOL = 1e-5
STEPS, SAVE_AT = 10, 5
# Same micro-batches on 1 and 2 ranks: micro-batch 2, global batch 8.
COMMON = (
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "optim.lr=3e-4",
    "optim.eps=1e-4",
)
MOMA_EC = ("experiment=tiny_moma", "trainer.log_interval=1", *COMMON)
MOMA_TC = (*MOMA_EC, "moe=moma_4t4i_tc")
# The tiniest MoMa, for 4 ranks; a low clip threshold so that clipping acts every step.
TINY = (
    *MOMA_EC,
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_hidden=64",
    "model.n_layers=2",
    "data.seq_len=32",
    "optim.grad_clip=0.1",
)


def _close(got: list[dict], want: list[dict], steps, keys=("loss", "grad_norm")) -> None:
    by_step = {m["step"]: m for m in got}
    ref = {m["step"]: m for m in want}
    for step in steps:
        for key in keys:
            a, b = by_step[step][key], ref[step][key]
            assert abs(a - b) <= REL_TOL * abs(b), (step, key, a, b)


def _ckpt(run_dir, step: int) -> str:
    return f"checkpoint.resume={run_dir}/checkpoints/step_{step:08d}"


@pytest.fixture(scope="module")
def moma_one_rank(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moma_ep1")
    train(run_dir, *MOMA_EC, f"trainer.max_steps={STEPS}", f"checkpoint.interval={SAVE_AT}")
    return run_dir


@pytest.fixture(scope="module")
def moma_ep2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moma_ep2")
    train(
        run_dir,
        *MOMA_EC,
        f"trainer.max_steps={STEPS}",
        f"checkpoint.interval={SAVE_AT}",
        "parallel.expert_parallel_size=2",
        "parallel.zero_stage=2",
        nproc=2,
    )
    return run_dir


def test_moma_expert_choice_ep2_equals_one_rank(moma_one_rank, moma_ep2):
    _close(metrics(moma_ep2), metrics(moma_one_rank), range(1, STEPS + 1))


def test_checkpoint_ep2_two_ranks_resumes_at_ep1_one_rank(tmp_path, moma_one_rank, moma_ep2):
    train(tmp_path, *MOMA_EC, f"trainer.max_steps={STEPS}", _ckpt(moma_ep2, SAVE_AT))
    _close(metrics(tmp_path), metrics(moma_one_rank), range(SAVE_AT + 1, STEPS + 1))


def test_checkpoint_ep1_one_rank_resumes_at_ep2_two_ranks(tmp_path, moma_one_rank):
    train(
        tmp_path,
        *MOMA_EC,
        f"trainer.max_steps={STEPS}",
        _ckpt(moma_one_rank, SAVE_AT),
        "parallel.expert_parallel_size=2",
        "parallel.zero_stage=1",
        nproc=2,
    )
    _close(metrics(tmp_path), metrics(moma_one_rank), range(SAVE_AT + 1, STEPS + 1))


def test_token_choice_ep2_equals_one_rank(tmp_path):
    train(tmp_path / "one", *MOMA_TC, f"trainer.max_steps={STEPS}")
    train(
        tmp_path / "ep2",
        *MOMA_TC,
        f"trainer.max_steps={STEPS}",
        "parallel.expert_parallel_size=2",
        nproc=2,
    )
    _close(metrics(tmp_path / "ep2"), metrics(tmp_path / "one"), range(1, STEPS + 1))


def test_four_ranks_ep4_and_ep2_equal_one_rank(tmp_path):
    """EP=4 (ZeRO-2) from the start; EP=2 on 4 ranks (two copies of every expert, ZeRO-0)
    resumed from the 1-rank checkpoint."""
    steps = 6
    one = tmp_path / "one"
    train(one, *TINY, f"trainer.max_steps={steps}", "checkpoint.interval=3")
    train(
        tmp_path / "ep4",
        *TINY,
        f"trainer.max_steps={steps}",
        "parallel.expert_parallel_size=4",
        "parallel.zero_stage=2",
        nproc=4,
    )
    _close(metrics(tmp_path / "ep4"), metrics(one), range(1, steps + 1))
    train(
        tmp_path / "ep2",
        *TINY,
        f"trainer.max_steps={steps}",
        _ckpt(one, 3),
        "parallel.expert_parallel_size=2",
        nproc=4,
    )
    _close(metrics(tmp_path / "ep2"), metrics(one), range(4, steps + 1))


def test_wrong_expert_parallel_size_fails_before_training(tmp_path):
    proc = train(
        tmp_path, *MOMA_EC, "trainer.max_steps=1", "parallel.expert_parallel_size=2", check=False
    )
    assert proc.returncode == 2
    assert "parallel.expert_parallel_size=2 must divide the world size 1" in proc.stderr
