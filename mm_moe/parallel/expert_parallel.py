"""Expert parallelism, applied from outside to the single-device model (torchtitan style).

    check_expert_parallel(parallel, moe, world)  # before any process group: clear errors
    ep = shard_experts(model, parallel, device)  # groups, sharding, all-to-all dispatcher

Process groups (tensor and pipeline parallel sizes are 1 for now; megatron-core's order
tp-cp-ep-dp-pp keeps their place): data-parallel = every rank (every rank reads different data),
expert-model-parallel = runs of `ep` consecutive ranks that exchange tokens by all-to-all,
expert-data-parallel = ranks holding the same experts (stride `ep`).

DeepSpeed is told through the MoE class swap of deepspeed_fixes.py: each MoE layer becomes an
`ExpertParallelMoELayer` (the way torch's `fully_shard` swaps a module's class). Gradient
scaling then needs nothing extra: each rank's objective is multiplied by the data-parallel size
(trainer/step.py); the all-to-all backward sums, on the owner, the gradients of every EP rank's
tokens; DeepSpeed sums expert gradients over the expert-data-parallel group and divides by the
data-parallel size, which leaves the gradient of the global-token mean, as for dense
parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from torch import nn

from mm_moe.errors import UserError
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.all_to_all import AllToAllDispatcher
from mm_moe.parallel.config import ParallelConfig
from mm_moe.parallel.deepspeed_fixes import DeepSpeedExpertLayer, deepspeed_groups
from mm_moe.parallel.placement import ExpertPlacement

EXPERT_PARAMS = ("w_gate_up", "w_down")


def placement_for(moe: MoEConfig, ep_size: int) -> ExpertPlacement:
    return ExpertPlacement(tuple((g.name, g.num_experts) for g in moe.groups()), ep_size)


def check_expert_parallel(parallel: ParallelConfig, moe: MoEConfig, world_size: int) -> None:
    """User errors, raised before any process group starts."""
    ep = parallel.expert_parallel_size
    if ep == 1:
        return
    if not moe.enabled:
        raise UserError(
            f"parallel.expert_parallel_size={ep} needs MoE layers, but "
            "moe.experts_per_modality is empty (moe=none); use parallel.expert_parallel_size=1"
        )
    model_parallel = ep * parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if world_size % model_parallel:
        raise UserError(
            f"parallel.expert_parallel_size={ep} must divide the world size {world_size} "
            "(processes launched by torchrun: nodes x --nproc_per_node)"
        )
    placement_for(moe, ep)  # every group's expert count must divide by the EP size


@dataclass
class ExpertParallel:
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup  # exchanges tokens (all-to-all)
    edp_group: dist.ProcessGroup  # holds the same experts (expert gradients reduced here)
    dp_group: dist.ProcessGroup  # every rank here (dense gradients reduced here)

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for these groups (tags on expert parameters, optimizer groups)."""
        return f"ep_size_{self.ep_size}"

    def check_deepspeed_groups(self) -> None:
        """DeepSpeed's expert / expert-data groups are megatron-core's rank sets."""
        ours = {
            "expert-parallel": self.ep_group,
            "expert-data-parallel": self.edp_group,
            "data-parallel": self.dp_group,
        }
        for what, ds_group in deepspeed_groups(self.ep_size, self.group_name).items():
            ds_ranks = dist.get_process_group_ranks(ds_group)
            mc_ranks = dist.get_process_group_ranks(ours[what])
            assert ds_ranks == mc_ranks, (what, ds_ranks, mc_ranks)


def init_expert_parallel(parallel: ParallelConfig) -> ExpertParallel:
    """Collective: megatron-core parallel_state groups, and DeepSpeed's groups of the same
    rank sets. Call after the default process group exists, on every rank."""
    from mm_moe.parallel.megatron_state import parallel_state

    mpu = parallel_state()
    ep = parallel.expert_parallel_size
    if dist.get_world_size() % ep:
        raise UserError(
            f"parallel.expert_parallel_size={ep} must divide the world size {dist.get_world_size()}"
        )
    sizes = (parallel.tensor_parallel_size, parallel.pipeline_parallel_size, ep)
    if mpu.model_parallel_is_initialized():  # a second run in this process (Hydra multirun)
        current = (
            mpu.get_tensor_model_parallel_world_size(),
            mpu.get_pipeline_model_parallel_world_size(),
            mpu.get_expert_model_parallel_world_size(),
        )
        if current != sizes:
            mpu.destroy_model_parallel()
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_parallel_size,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=max(1, math.ceil(parallel.timeout_s / 60)),
            create_gloo_process_groups=False,
        )
    out = ExpertParallel(
        ep_size=ep,
        ep_rank=mpu.get_expert_model_parallel_rank(),
        ep_group=mpu.get_expert_model_parallel_group(),
        edp_group=mpu.get_expert_data_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
    )
    out.check_deepspeed_groups()
    return out


class ExpertParallelMoELayer(MoELayer, DeepSpeedExpertLayer):
    """An MoELayer holding its share of the experts and exchanging tokens by all-to-all.

    Made only by `convert` (DeepSpeed's MoE.__init__ never runs; see deepspeed_fixes.py).
    """

    placement: ExpertPlacement
    expert_parallel: ExpertParallel

    def __init__(self, *args, **kwargs):
        raise TypeError("build a MoELayer and convert it with ExpertParallelMoELayer.convert")

    @classmethod
    def convert(cls, layer: MoELayer, ep: ExpertParallel, device: torch.device) -> None:
        placement = placement_for(layer.cfg, ep.ep_size)
        global_ids = placement.local_experts(ep.ep_rank)
        local_ids = torch.tensor(global_ids, device=device)
        experts = layer.experts
        for name in EXPERT_PARAMS:
            # Sliced from the whole initialisation (same seed on every rank): the same weights
            # as at EP=1.
            whole = getattr(experts, name)
            shard = nn.Parameter(whole.detach().index_select(0, local_ids).clone())
            setattr(experts, name, shard)
        experts.num_experts = placement.experts_per_rank
        experts.global_ids = global_ids
        layer.dispatcher = AllToAllDispatcher(placement, ep.ep_group, device)
        layer.placement, layer.expert_parallel = placement, ep
        layer.__class__ = cls
        shards = [getattr(experts, name) for name in EXPERT_PARAMS]
        layer.declare(ep.ep_size, ep.group_name, placement.experts_per_rank, shards)


def shard_experts(model: nn.Module, parallel: ParallelConfig, device) -> ExpertParallel | None:
    """Expert parallelism for `model` (groups, sharding, dispatcher), in place; None at EP=1,
    where the model is left as it is. Build the optimizer afterwards."""
    if parallel.expert_parallel_size == 1:
        return None
    ep = init_expert_parallel(parallel)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert layers, "expert parallelism needs MoE layers (checked by check_expert_parallel)"
    for layer in layers:
        ExpertParallelMoELayer.convert(layer, ep, device)
    return ep


def expert_parallel_of(model: nn.Module) -> ExpertParallel | None:
    for m in model.modules():
        if isinstance(m, ExpertParallelMoELayer):
            return m.expert_parallel
    return None


def sharded_experts(model: nn.Module) -> dict[str, ExpertParallelMoELayer]:
    """{parameter name: its layer} for every expert parameter sharded over expert parallelism."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelMoELayer):
            for name in EXPERT_PARAMS:
                out[f"{prefix}.experts.{name}"] = m
    return out


def grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of every gradient, each expert counted once: dense gradients are the same on
    every rank, expert gradients the same within an expert-data-parallel group, so the
    squares of expert gradients are summed over the expert-parallel group."""
    dense, expert = [], []
    device = next(model.parameters()).device
    for p in model.parameters():
        if p.grad is not None:
            (expert if is_moe_param(p) else dense).append(p.grad.detach().float().norm(2))
    ep = expert_parallel_of(model)
    if ep is None and not expert:
        # DeepSpeed's ZeRO-0 clip norm to the bit (per-parameter norms, squares summed, then
        # the square root as a power): the clip that uses this norm replaces DeepSpeed's, and
        # a different rounding of it can flip a later routing decision.
        return torch.stack(dense).pow(2).sum().pow(0.5) if dense else torch.zeros((), device=device)
    total = (
        torch.linalg.vector_norm(torch.stack(dense)) if dense else torch.zeros((), device=device)
    )
    expert_sq = torch.stack(expert).square().sum() if expert else torch.zeros((), device=device)
    if ep is not None:
        dist.all_reduce(expert_sq, group=ep.ep_group)
    return (total.square() + expert_sq).sqrt()
