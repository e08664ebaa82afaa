"""Expert parallelism, applied from outside to the single-device model (torchtitan style).

    check_expert_parallel(parallel, moe, world)  # before any process group: clear ValueErrors
    ep = init_expert_parallel(parallel)           # megatron-core groups, DeepSpeed asserted equal
    parallelize_experts(model, ep, device)        # shard experts, all-to-all dispatcher, tags
    split_moe_param_groups(optimizer)             # expert params in their own 'moe' groups
    engine = deepspeed.initialize(...)            # recognises the layers as DeepSpeed MoE
    fix_engine(engine, ep)                        # ZeRO-0 clipping counts every expert once

Process groups (tensor and pipeline parallel sizes are 1 for now; megatron-core's order
tp-cp-ep-dp-pp keeps their place): data-parallel = every rank (every rank reads different data),
expert-model-parallel = runs of `ep` consecutive ranks that exchange tokens by all-to-all,
expert-data-parallel = ranks holding the same experts (stride `ep`).

How DeepSpeed is told: each MoE layer's class becomes `ExpertParallelMoELayer`, a subclass of
both `MoELayer` and `deepspeed.moe.layer.MoE` (the way torch's `fully_shard` swaps a module's
class for an FSDP subclass). Nothing of DeepSpeed's MoE runs: its engine only needs the
isinstance check to set up expert-data-parallel reductions and to hand the ZeRO optimizer its
expert groups; expert parameters carry DeepSpeed's tags (`allreduce=False`,
`group_name="ep_size_<ep>"`). Gradient scaling then needs nothing extra: each rank's objective
is multiplied by the data-parallel size (trainer/step.py); the all-to-all backward sums, on the
owner, the gradients of every EP rank's tokens; DeepSpeed sums expert gradients over the
expert-data-parallel group and divides by the data-parallel size, which leaves the gradient of
the global-token mean, as for dense parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param
from torch import nn

from mm_moe.errors import UserError
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.all_to_all import AllToAllDispatcher
from mm_moe.parallel.config import ParallelConfig
from mm_moe.parallel.placement import ExpertPlacement

EXPERT_PARAMS = ("w_gate_up", "w_down")


def placement_for(moe: MoEConfig, ep_size: int) -> ExpertPlacement:
    return ExpertPlacement(tuple((name, n) for name, _, n in moe.groups()), ep_size)


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
        from deepspeed.utils import groups

        pairs = {
            "expert-parallel": (groups._get_expert_parallel_group(self.group_name), self.ep_group),
            "expert-data-parallel": (
                groups._get_expert_data_parallel_group(self.group_name),
                self.edp_group,
            ),
            "data-parallel": (groups._get_data_parallel_group(), self.dp_group),
        }
        for what, (ds_group, mc_group) in pairs.items():
            ds_ranks = dist.get_process_group_ranks(ds_group)
            mc_ranks = dist.get_process_group_ranks(mc_group)
            assert ds_ranks == mc_ranks, (what, ds_ranks, mc_ranks)


def init_expert_parallel(parallel: ParallelConfig) -> ExpertParallel:
    """Collective: megatron-core parallel_state groups, and DeepSpeed's groups of the same
    rank sets. Call after the default process group exists, on every rank."""
    from deepspeed.utils import groups
    from megatron.core import parallel_state as mpu

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
    if out.group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    out.check_deepspeed_groups()
    return out


class ExpertParallelMoELayer(MoELayer, DeepSpeedMoE):
    """An MoELayer holding its share of the experts and exchanging tokens by all-to-all.

    Made only by `convert` (DeepSpeed's MoE.__init__ never runs); subclassing DeepSpeed's MoE
    is what makes its engine set up expert-data-parallel gradient reduction (see module doc).
    """

    placement: ExpertPlacement
    expert_parallel: ExpertParallel

    def __init__(self, *args, **kwargs):
        raise TypeError("build a MoELayer and convert it with ExpertParallelMoELayer.convert")

    @classmethod
    def convert(cls, layer: MoELayer, ep: ExpertParallel, device: torch.device) -> None:
        placement = ExpertPlacement(tuple((n, e) for n, _, e in layer.group_specs), ep.ep_size)
        local_ids = torch.tensor(placement.local_experts(ep.ep_rank), device=device)
        experts = layer.experts
        for name in EXPERT_PARAMS:
            # Sliced from the whole initialisation (same seed on every rank): the same weights
            # as at EP=1.
            whole = getattr(experts, name)
            shard = nn.Parameter(whole.detach().index_select(0, local_ids).clone())
            shard.allreduce, shard.group_name = False, ep.group_name
            setattr(experts, name, shard)
        experts.num_experts = placement.experts_per_rank
        layer.dispatcher = AllToAllDispatcher(placement, ep.ep_group, device)
        layer.placement, layer.expert_parallel = placement, ep
        # What DeepSpeed reads from its own MoE layers.
        layer.ep_size, layer.expert_group_name = ep.ep_size, ep.group_name
        layer.num_local_experts = placement.experts_per_rank
        layer.__class__ = cls

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine on every MoE layer: the groups already exist."""
        if use_data_before_expert_parallel_:
            raise UserError(
                "DeepSpeed's use_data_before_expert_parallel_ changes the expert group layout; "
                "mm_moe uses megatron-core's (consecutive expert-parallel ranks)"
            )
        self.expert_parallel.check_deepspeed_groups()


def parallelize_experts(model: nn.Module, ep: ExpertParallel, device: torch.device) -> None:
    """Shard every MoE layer's experts over the expert-parallel group, in place."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert layers, "expert parallelism needs MoE layers (checked by check_expert_parallel)"
    for layer in layers:
        ExpertParallelMoELayer.convert(layer, ep, device)


def parallelize(model: nn.Module, parallel: ParallelConfig, device) -> ExpertParallel | None:
    """Expert parallelism for `model` (groups, sharding, dispatcher); None at EP=1, where the
    model is left as it is. Build the optimizer afterwards, then `split_moe_param_groups`."""
    if parallel.expert_parallel_size == 1:
        return None
    ep = init_expert_parallel(parallel)
    parallelize_experts(model, ep, device)
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


def split_moe_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Move expert parameters into their own param groups, marked the way DeepSpeed's ZeRO
    expects ('moe': True, 'name': the expert group's name); other settings are copied. Before
    the first step (no state yet)."""
    assert not optimizer.state, "split the param groups before the first step"
    groups = []
    for group in optimizer.param_groups:
        dense = [p for p in group["params"] if not is_moe_param(p)]
        if dense:
            groups.append({**group, "params": dense})
        by_name: dict[str, list] = {}
        for p in group["params"]:
            if is_moe_param(p):
                by_name.setdefault(p.group_name, []).append(p)
        for name, params in by_name.items():
            groups.append({**group, "params": params, "moe": True, "name": name})
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of every gradient, each expert counted once: dense gradients are the same on
    every rank, expert gradients the same within an expert-data-parallel group, so the
    squares of expert gradients are summed over the expert-parallel group."""
    dense, expert = [], []
    device = next(model.parameters()).device
    for p in model.parameters():
        if p.grad is not None:
            (expert if is_moe_param(p) else dense).append(torch.linalg.vector_norm(p.grad.float()))
    total = (
        torch.linalg.vector_norm(torch.stack(dense)) if dense else torch.zeros((), device=device)
    )
    ep = expert_parallel_of(model)
    if ep is None and not expert:
        return total
    expert_sq = torch.stack(expert).square().sum() if expert else torch.zeros((), device=device)
    if ep is not None:
        dist.all_reduce(expert_sq, group=ep.ep_group)
    return (total.square() + expert_sq).sqrt()


def fix_engine(engine, ep: ExpertParallel) -> None:
    """DeepSpeed's ZeRO-0 fp32 clipping averages each rank's local norm (dense + its own
    experts) over data-parallel ranks, which is not the global norm under expert parallelism:
    clip with `grad_norm` instead, and keep the norm where DeepSpeed's ZeRO optimizers keep
    theirs (`engine.get_global_grad_norm()`), so the logged grad_norm is the one clipping used.
    (ZeRO-1/2 sum the squared norms of expert partitions over all data-parallel ranks, which
    counts each expert once; the bf16 optimizer sums them over the expert-parallel group.
    tests/distributed/test_expert_parallel.py checks the logged grad_norm against EP=1's.)"""
    ep.check_deepspeed_groups()

    def clip_fp32_gradients():
        max_norm = engine.gradient_clipping()
        norm = grad_norm(engine.module)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients
    engine.clips_with_expert_parallel_norm = True
