"""Expert placement, start-up checks and the per-expert checkpoint keys (no processes)."""

from __future__ import annotations

import pytest
import torch

from mm_moe.checkpoint.experts import expert_keys, split_experts, stack_experts
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.config import ParallelConfig
from mm_moe.parallel.expert_parallel import check_expert_parallel
from mm_moe.parallel.placement import ExpertPlacement

MOMA = (("text", 4), ("image", 4))


def test_every_rank_holds_a_share_of_every_group():
    p = ExpertPlacement(MOMA, 2)
    assert p.local_experts(0) == [0, 1, 4, 5]  # text 0-1, image 0-1
    assert p.local_experts(1) == [2, 3, 6, 7]
    assert [p.owner(e) for e in (0, 3, 4, 7)] == [(0, 0), (1, 1), (0, 2), (1, 3)]
    # Dispatch slots: rank 0's experts first, each rank's in local order.
    assert p.slot_of_expert().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    p4 = ExpertPlacement(MOMA, 4)
    assert [p4.local_experts(r) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_placement_is_the_identity_at_ep1_and_a_permutation_otherwise():
    assert ExpertPlacement(MOMA, 1).slot_of_expert().tolist() == list(range(8))
    for ep in (2, 4):
        p = ExpertPlacement((("text", 8), ("image", 4)), ep)
        slots = p.slot_of_expert()
        assert sorted(slots.tolist()) == list(range(12))
        for r in range(ep):
            for local, e in enumerate(p.local_experts(r)):
                assert p.owner(e) == (r, local)
                assert slots[e] == r * p.experts_per_rank + local


def _check(ep: int, moe: MoEConfig, world: int):
    check_expert_parallel(ParallelConfig(expert_parallel_size=ep), moe, world)


def test_start_up_checks_name_the_keys():
    moma = MoEConfig(experts_per_modality={"text": 4, "image": 4})
    _check(1, MoEConfig(), 3)  # EP=1: anything goes
    _check(2, moma, 4)
    with pytest.raises(ValueError, match="expert_parallel_size=2 must divide the world size 3"):
        _check(2, moma, 3)
    with pytest.raises(ValueError, match="needs MoE layers.*moe.experts_per_modality"):
        _check(2, MoEConfig(), 2)
    uneven = MoEConfig(experts_per_modality={"text": 4, "image": 2})
    with pytest.raises(ValueError, match="must divide the 2 experts of group 'image'"):
        _check(4, uneven, 4)
    # Granularity multiplies the experts: 2 x 2 image experts split over 4 ranks.
    _check(4, MoEConfig(experts_per_modality={"text": 4, "image": 2}, granularity=2), 4)


def test_checkpoint_keys_name_each_expert_once():
    layer = torch.nn.Module()
    layer.ffn = MoELayer(MoEConfig(experts_per_modality={"text": 2, "image": 3}), 8, 16, 0)
    keys = expert_keys(layer)
    assert keys["ffn.experts.w_down"] == [
        "ffn.experts.text.0.w_down",
        "ffn.experts.text.1.w_down",
        "ffn.experts.image.0.w_down",
        "ffn.experts.image.1.w_down",
        "ffn.experts.image.2.w_down",
    ]
    state = {n: p.detach().clone() for n, p in layer.named_parameters()}
    moments = {n: {"exp_avg": t + 1, "exp_avg_sq": t * 2} for n, t in state.items()}
    on_disk = split_experts(state, keys)
    assert "ffn.experts.w_gate_up" not in on_disk
    assert torch.equal(on_disk["ffn.experts.image.1.w_gate_up"], state["ffn.experts.w_gate_up"][3])
    back = stack_experts(on_disk, keys, "ckpt")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    m_back = stack_experts(split_experts(moments, keys), keys, "ckpt")
    assert torch.equal(
        m_back["ffn.experts.w_down"]["exp_avg"], moments["ffn.experts.w_down"]["exp_avg"]
    )
    # A format-1 checkpoint (stacked experts) loads as it is.
    assert stack_experts(dict(state), keys, "ckpt").keys() == state.keys()
    del on_disk["ffn.experts.text.1.w_down"]
    with pytest.raises(ValueError, match="text.1.w_down"):
        stack_experts(on_disk, keys, "ckpt")
