"""The auxiliary routers are clipped apart: however large their gradients, the main model's
update is the one it takes without them (2 ranks, gloo; ZeRO-2, and ZeRO-0 with expert
parallelism 2, where mm_moe's own clip runs)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tests.distributed.multiprocess import run_distributed


def _training(root: Path, zero_stage: int, ep: int, aux_coef: float):
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.trainer.build import build_training

    cfg = from_dict(
        TrainConfig,
        {
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1},
            "moe": {"experts_per_modality": {"text": 2, "image": 2}, "aux_router_coef": aux_coef},
            "data": {"seq_len": 32},
            "optim": {"grad_clip": 0.5, "warmup_steps": 0},
            "trainer": {"global_batch_size": 4, "max_steps": 5, "run_dir": str(root)},
            "parallel": {"zero_stage": zero_stage, "expert_parallel_size": ep},
            "logging": {"wandb": {"mode": "disabled"}},
        },
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    return build_training(cfg)


def _one_step(root: Path, zero_stage: int, ep: int, aux_coef: float):
    from mm_moe.parallel import full_state
    from mm_moe.trainer.step import train_step

    t = _training(root, zero_stage, ep, aux_coef)
    world = torch.distributed.get_world_size()
    stats = train_step(t.engine, t.loader.next(), 0.0, world, torch.device("cpu"))
    return full_state.gather_model(t.engine), stats


def _check(rank: int, world: int, root: str, zero_stage: int, ep: int) -> None:
    without, stats0 = _one_step(Path(root) / "a", zero_stage, ep, 0.0)
    heavy, stats1 = _one_step(Path(root) / "b", zero_stage, ep, 1e4)
    assert stats1["grad_norm_aux"] > 100 * stats1["grad_norm"]  # aux gradients made large
    assert math.isnan(stats0["grad_norm_aux"])  # no aux loss, no aux step
    assert stats0["grad_norm"] == pytest.approx(stats1["grad_norm"], rel=1e-6)
    assert stats1["grad_norm"] > 0.5  # the main model's clip acted
    moved = 0
    for name, value in without.items():
        if ".aux_routers." in name:
            moved += int(not torch.equal(value, heavy[name]))
            continue
        assert torch.allclose(value, heavy[name], rtol=0, atol=1e-7), name
    assert moved > 0  # the auxiliary routers did learn


@pytest.mark.parametrize("zero_stage, ep", [(2, 1), (0, 2)], ids=["zero2", "zero0_ep2"])
def test_aux_router_gradients_do_not_clip_the_main_model(tmp_path, zero_stage, ep):
    run_distributed(_check, str(tmp_path), zero_stage, ep, world_size=2)
