"""The MoE variants through the real training command."""

from __future__ import annotations

import math

from tests.helpers import metrics, train


def test_tiny_moma_trains_and_logs_expert_load(tmp_path):
    train(
        tmp_path,
        "experiment=tiny_moma",
        "trainer.max_steps=60",
        "trainer.log_interval=10",
        "optim.decay_steps=0",
    )
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    last = rows[-1]
    for layer in range(4):
        for group in ("text", "image"):
            loads = [last[f"moe/l{layer}/{group}/load_e{e}"] for e in range(4)]
            assert abs(sum(loads) - 1) < 1e-6
            assert f"moe/l{layer}/{group}/dropped" in last
            # better than always saying "not selected" (1 - 1/4 of the pairs)
            acc = last[f"moe/l{layer}/{group}/aux_router_acc"]
            assert last[f"moe/l{layer}/{group}/aux_router_baseline"] + 0.02 < acc <= 1
    # The aux routers' BCE (summed over layers and groups) fell, and is below what the best
    # constant guess (each group's base rate of "selected") scores: they learned from tokens.
    base_rate = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))
    bound = sum(
        base_rate(1 - last[f"moe/l{layer}/{group}/aux_router_baseline"])
        for layer in range(4)
        for group in ("text", "image")
    )
    bce = [r["aux/moe/aux_router_bce"] for r in rows]
    assert bce[-1] < bce[0] and bce[-1] < bound, (bce, bound)


def test_mot_mod_token_choice_trains(tmp_path):
    train(
        tmp_path,
        "experiment=tiny_moma",
        "moe=moma_4t4i_tc",
        "trainer.max_steps=6",
        "model.untie=[attention,norms]",
        "model.mod.layers=[1,3]",
        "model.mod.capacity=0.5",
    )
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "mod/l1/aux_router_acc" in rows[-1] and "aux/moe/load_balance" in rows[-1]


def test_untrained_auxiliary_routers_are_said_and_checkpoint(tmp_path):
    """moe.aux_router_coef=0 gives the auxiliary routers no gradient and no Adam state: the
    run says they are untrained (evaluation routes by them), saves and resumes."""
    args = ("experiment=tiny_moma", "moe.aux_router_coef=0", "checkpoint.interval=1")
    first = train(tmp_path, *args, "trainer.max_steps=2")
    assert "moe.aux_router_coef=0: expert choice's auxiliary routers are not trained" in (
        first.stdout + first.stderr
    )
    train(tmp_path, *args, "trainer.max_steps=3", "checkpoint.resume=auto")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
