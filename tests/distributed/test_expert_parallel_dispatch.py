"""The all-to-all dispatcher and the expert-parallel MoE layer on 2 gloo processes, against the
same layer with all experts on every rank: outputs, input gradients and expert gradients (the
sum over ranks of the single-device gradients), including ranks that send nothing and experts
that get no tokens.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.distributed as dist

from mm_moe.model.context import ForwardContext
from mm_moe.model.modality_ops import ModalityRows
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.experts import GroupedExperts
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.all_to_all import AllToAllDispatcher
from mm_moe.parallel.placement import ExpertPlacement
from tests.distributed.multiprocess import run_distributed

D, HIDDEN, B, S = 16, 24, 2, 12
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _check_dispatcher(rank: int, world: int, device: str = "cpu") -> None:
    """Counts per expert (4 experts, 2 per rank) chosen to leave a rank sending nothing to the
    other, a rank sending nothing at all, an expert with no rows, and no rows anywhere."""
    dev = torch.device(device)
    placement = ExpertPlacement((("mixed", 4),), world)  # one group: slot == global id
    ids = placement.local_experts(rank)
    torch.manual_seed(0)
    whole = GroupedExperts(4, D, HIDDEN).to(dev)
    local = GroupedExperts(2, D, HIDDEN).to(dev)
    with torch.no_grad():
        local.w_gate_up.copy_(whole.w_gate_up[ids])
        local.w_down.copy_(whole.w_down[ids])
    dispatcher = AllToAllDispatcher(placement, dist.group.WORLD, dev)
    cases = [
        ([2, 0, 1, 3], [0, 0, 0, 2]),  # rank 1 sends rank 0 nothing; expert 1 gets no rows
        ([0, 0, 0, 0], [1, 0, 0, 2]),  # rank 0 sends nothing at all
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # no rows anywhere
    ]
    for case, counts_per_rank in enumerate(cases):
        counts = torch.tensor(counts_per_rank[rank], device=dev)
        gen = torch.Generator().manual_seed(10 * case + rank)
        x = torch.randn(int(counts.sum()), D, generator=gen).to(dev)
        w = torch.randn(int(counts.sum()), D, generator=gen).to(dev)
        for m in (whole, local):
            m.zero_grad(set_to_none=True)
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref = whole(x_ref, counts)
        (y_ref * w).sum().backward()
        y_ep = dispatcher(x_ep, counts, local)
        (y_ep * w).sum().backward()
        torch.testing.assert_close(y_ep, y_ref, **TOL)
        torch.testing.assert_close(x_ep.grad, x_ref.grad, **TOL)
        global_counts = _summed_over_ranks(counts)
        for name in ("w_gate_up", "w_down"):
            want = _summed_over_ranks(getattr(whole, name).grad)[ids]
            got = getattr(local, name).grad
            torch.testing.assert_close(got, want, **TOL)
            for j, e in enumerate(ids):
                if global_counts[e] == 0:  # an expert without tokens: exactly zero gradient
                    assert got[j].abs().max() == 0, (case, e)


def _ctx(modality_BS: torch.Tensor, valid_BS: torch.Tensor) -> ForwardContext:
    return ForwardContext.for_layer(modality_BS, valid_BS)


def _check_layer(rank: int, world: int, cfg: MoEConfig, rank1: str, device: str = "cpu") -> None:
    """ExpertParallelMoELayer (EP = world) against the whole layer on this rank's batch.
    rank1: 'mixed' tokens, 'text' only (no image rows from rank 1), or 'none' valid."""
    from mm_moe.parallel.expert_parallel import ExpertParallel, ExpertParallelMoELayer

    dev = torch.device(device)
    torch.manual_seed(0)
    ref = MoELayer(cfg, D, HIDDEN, layer_index=0).to(dev)
    layer = copy.deepcopy(ref)
    self_groups = [dist.new_group([r]) for r in range(world)]
    ep = ExpertParallel(world, rank, dist.group.WORLD, self_groups[rank], dist.group.WORLD)
    ExpertParallelMoELayer.convert(layer, ep, dev)
    assert layer.experts.w_gate_up.shape[0] == layer.num_experts // world
    assert layer.experts.w_down.allreduce is False and layer.experts.w_down.group_name

    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, S, D, generator=gen).to(dev)
    w = torch.randn(B, S, D, generator=gen).to(dev)
    modality = torch.randint(0, 2, (B, S), generator=gen).to(dev)
    valid = torch.ones(B, S, dtype=torch.bool, device=dev)
    if rank == 1 and rank1 == "text":
        modality.zero_()
    if rank == 1 and rank1 == "none":
        valid.zero_()
    outs = {}
    for key, m in (("ref", ref), ("ep", layer)):
        xi = x.clone().requires_grad_()
        y = m(xi, _ctx(modality, valid))
        (y * w).sum().backward()
        outs[key] = (y, xi.grad)
    torch.testing.assert_close(outs["ep"][0], outs["ref"][0], **TOL)
    torch.testing.assert_close(outs["ep"][1], outs["ref"][1], **TOL)
    for name, p in ref.routers.named_parameters():
        torch.testing.assert_close(dict(layer.routers.named_parameters())[name].grad, p.grad, **TOL)
    ids = layer.placement.local_experts(rank)
    for name in ("w_gate_up", "w_down"):
        want = _summed_over_ranks(getattr(ref.experts, name).grad)[ids]
        torch.testing.assert_close(getattr(layer.experts, name).grad, want, **TOL)
    _check_syncs(layer, x, modality, valid)


def _check_syncs(layer, x, modality, valid) -> None:
    """Two MoE layers of one forward (the layer applied twice to one context), forward and
    backward, under expert parallelism: expert choice makes the forward's one host sync (the
    groups' sizes, gathered from every rank) and none per layer; token choice one more per
    layer (its split sizes, with its experts' counts)."""
    from mm_moe.utils.host_syncs import HostSyncCounter

    ctx = _ctx(modality, valid)
    with HostSyncCounter() as syncs:
        y = layer(layer(x.clone().requires_grad_(), ctx), ctx)
        y.sum().backward()
    budget = 1 if layer.cfg.router == "expert_choice" else 1 + 2  # 2 layers
    assert syncs.total <= budget, (layer.cfg.router, dict(syncs.by_op))
    if layer.cfg.router == "expert_choice":
        # MoT's per-modality rows fix the sizes before the first MoE layer: the ranks'
        # sizes are then gathered in one more sync, for the whole forward, with equal results.
        mot = replace(_ctx(modality, valid), rows=ModalityRows(modality, split=True), tokens=None)
        with HostSyncCounter() as syncs:
            y_mot = layer(layer(x, mot), mot)
        assert syncs.total <= 2, dict(syncs.by_op)
        torch.testing.assert_close(y_mot, y.detach(), **TOL)


CASES = [
    ("expert_choice", MoEConfig(experts_per_modality={"text": 4, "image": 4}), "mixed"),
    ("expert_choice_rank1_empty", MoEConfig(experts_per_modality={"text": 2, "image": 2}), "none"),
    (
        "token_choice_top2_rank1_text_only",
        MoEConfig(
            experts_per_modality={"text": 4, "image": 2},
            router="token_choice",
            score="softmax",
            top_k=2,
            capacity_factor=0.0,
        ),
        "text",
    ),
    (
        "mixed_group_fine_grained_shared",
        MoEConfig(experts_per_modality={"mixed": 2}, granularity=2, shared_experts=1),
        "mixed",
    ),
]


def _all_checks(rank: int, world: int, device: str = "cpu") -> None:
    _check_dispatcher(rank, world, device)
    for _, cfg, rank1 in CASES:
        _check_layer(rank, world, cfg, rank1, device)


def test_dispatcher_and_layer_match_single_device():
    # One spawn for every case: starting processes costs more than the checks.
    run_distributed(_all_checks, world_size=2, backend="gloo")
