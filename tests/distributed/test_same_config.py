"""Every rank must run the same config: ranks launched with different overrides (nodes started
by hand) are refused on every rank, naming the keys and each rank's value, before the first
collective that assumes one config (a rank with another expert-parallel size hung there)."""

from __future__ import annotations

import pytest

from tests.distributed.multiprocess import run_distributed


def _check(rank: int, world: int, differ: bool) -> None:
    from mm_moe.cli import compose
    from mm_moe.errors import UserError
    from mm_moe.trainer.build import check_same_config

    overrides = ["experiment=tiny_moma", "logging.wandb.mode=disabled"]
    if differ and rank == 1:
        overrides += ["optim.lr=1e-2", "parallel.expert_parallel_size=2"]
    cfg = compose(overrides)
    if not differ:
        check_same_config(cfg)
        return
    with pytest.raises(UserError) as err:
        check_same_config(cfg)
    message = str(err.value)
    assert "2 keys differ" in message, message
    assert "optim.lr: rank 0 0.003, rank 1 0.01" in message, message
    assert "parallel.expert_parallel_size: rank 0 1, rank 1 2" in message, message


@pytest.mark.parametrize("differ", [False, True], ids=["same", "different"])
def test_ranks_with_different_configs_are_refused(differ):
    run_distributed(_check, differ, world_size=2)
