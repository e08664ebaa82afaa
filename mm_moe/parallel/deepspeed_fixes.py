"""Every place mm_moe reaches into DeepSpeed beyond its public API, in one module, with the
DeepSpeed versions it was written and tested for (`check_version` warns at start outside them).

- The MoE class swap: expert-parallel layers subclass `deepspeed.moe.layer.MoE` (nothing of it
  runs), so that the engine reduces expert gradients over expert-data-parallel groups and ZeRO
  partitions expert optimizer state there; expert parameters carry DeepSpeed's tags and sit
  in param groups marked `'moe': True`.
- Dropping a step (`skip_optimizer_step`) through the optimizers' overflow paths.
- DeepSpeed's backward prologue, which it runs from hooks on the model's output and cannot
  find in a ModelOutput, hooked to the loss (`run_backward_prologue`): ZeRO's accumulation
  boundary, and the bf16 optimizer's `.grad`s zeroed before each backward.
- Reading gradients and norms inside the ZeRO / bf16 optimizers (`local_grads_finite`,
  `unsharded_grad_norm`, `last_grad_norm`).
- ZeRO-0 fp32 clipping with the norm the step computed, every expert counted once
  (`clip_with_step_norm`).
- One process, ZeRO-0, a plain optimizer: no gradient flatten for an all-reduce of one
  (`skip_lone_allreduce`).
- Re-linking ZeRO's tensor fragments to the Adam state of every param group
  (`relink_optimizer_fragments`).
- bf16 with ZeRO-0 runs DeepSpeed's ZeRO-1 optimizer (`zero_stage_for`).
- DeepSpeed's CPU shared-memory op is never built (`skip_shm_build`).
"""

from __future__ import annotations

import logging
import sys

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param

from mm_moe.errors import UserError
from mm_moe.parallel.config import optimizer_zero_stage

log = logging.getLogger("mm_moe")

TESTED_VERSIONS = ((0, 18), (0, 20))  # [from, to): pyproject pins deepspeed>=0.18,<0.20


def check_version() -> None:
    import deepspeed

    version = tuple(int(p) for p in deepspeed.__version__.split(".")[:2] if p.isdigit())
    low, high = TESTED_VERSIONS
    if not low <= version < high:
        log.warning(
            "deepspeed %s: mm_moe's DeepSpeed glue (mm_moe/parallel/deepspeed_fixes.py) was "
            "written for %d.%d up to (not including) %d.%d; check the expert-parallel and "
            "checkpoint tests before trusting a run",
            deepspeed.__version__,
            *low,
            *high,
        )


def float_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's fp32 buffers (RoPE frequencies, the experts' bias and load
    counts), for `restore_float_buffers` after `deepspeed.initialize`."""
    return {
        name: buf.detach().clone()
        for name, buf in model.named_buffers()
        if buf.dtype == torch.float32
    }


def restore_float_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """DeepSpeed before 0.19.2 casts buffers with the parameters to bf16 (`module.bfloat16()`):
    aux-loss-free balancing then loses its bias updates (1e-3 below bf16's spacing past 0.5)
    and RoPE its precision. Puts back the fp32 values; returns the names it restored."""
    restored = []
    for name, buf in model.named_buffers():
        if name in saved and buf.dtype != torch.float32:
            buf.data = saved[name].to(buf.device)
            restored.append(name)
    return restored


def skip_shm_build() -> None:
    """DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce for CPUs on
    start-up: a C++ build on the first run, under a file lock in ~/.cache/torch_extensions
    that a process killed mid-build leaves behind, so that every later start waits on it
    forever. Only DeepSpeed's inference all-reduce uses that op, so it is marked unavailable."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def zero_stage_for(zero_stage: int, bf16: bool) -> int:
    """DeepSpeed 0.19's ZeRO-0 bf16 path (FP16_UnfusedOptimizer) keeps its fp32 master weights
    apart from the parameters and leaves expert gradients out of its clipping norm; its ZeRO-1
    optimizer has neither problem and, at one rank per data-parallel group, shards nothing.
    The run's description says it (trainer/build.py `_describe`, once for all ranks)."""
    return optimizer_zero_stage(zero_stage, bf16)


# ---- the MoE class swap ----
class DeepSpeedExpertLayer(DeepSpeedMoE):
    """Mixin of expert-parallel MoE layers: DeepSpeed's engine takes any `MoE` instance for an
    expert layer (`has_moe_layers`, expert-data-parallel gradient reduction); its __init__
    never runs. `declare` sets what the engine reads."""

    def declare(self, ep_size: int, group_name: str, num_local_experts: int, params) -> None:
        self.ep_size, self.expert_group_name = ep_size, group_name
        self.num_local_experts = num_local_experts
        for p in params:  # DeepSpeed's expert-parameter tags
            p.allreduce, p.group_name = False, group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine on every MoE layer: the groups already exist (megatron-core's
        layout, checked against DeepSpeed's)."""
        if use_data_before_expert_parallel_:
            raise UserError(
                "DeepSpeed's use_data_before_expert_parallel_ changes the expert group layout; "
                "mm_moe uses megatron-core's (consecutive expert-parallel ranks)"
            )
        self.expert_parallel.check_deepspeed_groups()


def deepspeed_groups(ep_size: int, group_name: str) -> dict:
    """DeepSpeed's expert, expert-data and data-parallel groups for this EP size (created
    with megatron-core's rank layout when missing)."""
    from deepspeed.utils import groups

    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return {
        "expert-parallel": groups._get_expert_parallel_group(group_name),
        "expert-data-parallel": groups._get_expert_data_parallel_group(group_name),
        "data-parallel": groups._get_data_parallel_group(),
    }


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


# ---- clipping, norms and dropped steps ----
def _deepspeeds_optimizer(optimizer) -> bool:
    """DeepSpeed's bf16 or ZeRO optimizer, which keeps its own gradient buffers and norm (not
    the client's torch optimizer)."""
    return type(optimizer).__module__.startswith("deepspeed.")


def plain_zero0(engine) -> bool:
    """ZeRO stage 0 with the client's torch optimizer: fp32 gradients whole on every rank."""
    return engine.zero_optimization_stage() == 0 and not _deepspeeds_optimizer(engine.optimizer)


def clip_with_step_norm(engine, norm_fn) -> bool:
    """DeepSpeed's ZeRO-0 fp32 clipping computes the norm again, one parameter at a time, and
    averages each rank's local norm over data-parallel ranks, which is not the global norm
    under expert parallelism. Replaced by a clip with the norm the step computed before
    `engine.step()` (`unsharded_grad_norm`: `norm_fn(module)`, every expert counted once),
    the same device scalar the step copies to the host with its losses, so the logged
    grad_norm is the one clipping used and costs no copy of its own; one foreach multiply.
    (ZeRO-1/2 sum the squared norms of expert partitions over all data-parallel ranks, which
    counts each expert once; tests/distributed/test_expert_parallel.py checks grad_norm
    against EP=1's.) True where replaced."""
    if not plain_zero0(engine):
        return False

    def clip_fp32_gradients():
        norm = engine.__dict__.pop("norm_for_clip", None)
        if norm is None:  # a step taken without `unsharded_grad_norm` before it
            norm = norm_fn(engine.module)
        params = [p for p in engine.module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_fp32_gradients
    engine.clips_with_step_norm = True
    return True


def skip_lone_allreduce(engine) -> bool:
    """With one process there is nothing to all-reduce, but DeepSpeed's ZeRO-0 path still
    flattens every gradient into one buffer and copies it back at each accumulation boundary
    (a copy of every parameter, experts included: up to a tenth of a CPU MoE step). Replaced,
    for a plain optimizer (not DeepSpeed's bf16 or ZeRO ones, which reduce their own
    buffers), by the one thing that path does that changes the numbers: a trainable parameter
    with no gradient at the boundary (an expert no token reached) gets zeros, so AdamW decays
    it and moves its moments as it does with more processes. True where replaced."""
    if engine.world_size != 1 or not plain_zero0(engine):
        return False

    def allreduce_gradients(bucket_size=None):
        if not engine.is_gradient_accumulation_boundary():
            return
        for p in engine.module.parameters():
            if p.requires_grad and p.numel() and p.grad is None:
                p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = allreduce_gradients
    return True


def run_backward_prologue(engine) -> None:
    """DeepSpeed runs its backward prologue from hooks that its forward registers on the output
    tensors, which it finds only in a tensor, tuple, list or dict, not in the model's
    ModelOutput dataclass. The prologue tells a ZeRO optimizer whether this backward ends the
    step's accumulation; without it, the optimizer read the flag the last backward's epilogue
    left: the step's first micro-batch ran as the boundary and its last one did not. Under
    overlap_comm (on GPUs) a gradient bucket that filled during the first micro-batch's
    backward was then reduced on its own, and ZeRO-1 on several ranks trained on wrong
    gradients (tests/distributed/test_zero_equivalence.py, buckets small enough to fill). The
    prologue also zeroes the `.grad`s of DeepSpeed's bf16 optimizer (grad_accum_dtype=fp32),
    which adds them into its fp32 accumulators after each backward: without it they summed
    over the micro-batches and each sum was added again (4*g1 + 3*g2 + 2*g3 + g4). The loss
    given to `engine.backward`, where the backward starts, gets DeepSpeed's own hooks here.
    (The auxiliary routers' loss is not given to it: their backward is a torch.autograd.grad
    of its own.)"""
    from deepspeed.runtime.utils import register_output_backward_hooks

    backward = engine.backward

    def backward_with_prologue(loss, *args, **kwargs):
        # No per-tensor hook: engine.backward scales for the accumulation itself (that hook
        # would divide again, running before engine.backward marks the graph as scaled).
        register_output_backward_hooks(loss, preprocess_once_fn=engine._backward_prologue)
        return backward(loss, *args, **kwargs)

    engine.backward = backward_with_prologue


def unsharded_grad_norm(engine, norm_fn) -> torch.Tensor | None:
    """Global grad norm before clipping when gradients are whole on every rank (ZeRO-0 in
    fp32), a device scalar for the step's one copy to the host, kept for the clip of
    `clip_with_step_norm`; None when the ZeRO/bf16 optimizer computes it. Call after the last
    backward of a step, before `engine.step()`; collective under expert parallelism."""
    # By its class, not by `_global_grad_norm`, which DeepSpeed's bf16 optimizer sets only in
    # its first step (it computes the norm over its fp32 accumulators; `.grad` holds one
    # micro-batch's).
    if _deepspeeds_optimizer(engine.optimizer):
        return None
    norm = norm_fn(engine.module).detach()
    if getattr(engine, "clips_with_step_norm", False):
        engine.norm_for_clip = norm
    return norm


def last_grad_norm(engine) -> float:
    """Global grad norm of the last optimizer step, as the ZeRO/bf16 optimizer computed it."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def local_grads_finite(engine) -> torch.Tensor:
    """Whether the gradients this rank holds at the accumulation boundary (after the last
    backward, before `engine.step()`) are all finite: its ZeRO-1/2 partition of the reduced
    gradients, the bf16 optimizer's fp32 accumulators, or the whole reduced `.grad`s (ZeRO-0).
    A non-finite value on any rank reaches at least one rank's share after the reduction.
    A bool scalar on the device, never read here: the step all-reduces it (no host sync)."""
    opt = engine.optimizer
    if hasattr(opt, "has_overflow_partitioned_grads_serial"):  # ZeRO-1/2
        return ~opt.has_overflow_partitioned_grads_serial().reshape(())
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    grads += list(getattr(opt, "fp32_groups_gradient_flat_partition", []))  # bf16 optimizer
    if not grads:
        return torch.ones((), dtype=torch.bool, device=next(engine.module.parameters()).device)
    # One fused norm per tensor instead of a Python loop of checks: a norm is finite iff every
    # element is (or overflows fp32, which is no update to take either).
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()


def skip_optimizer_step(engine) -> None:
    """End the accumulation boundary without an update: call `engine.step()` with the optimizer
    reporting an overflow, DeepSpeed's own way to drop a step (its fp16 loss scaling). The
    gradients are discarded, parameters and optimizer state (Adam moments and step count) stay
    as they are, the LR scheduler is not stepped; DeepSpeed counts the step in
    `engine.skipped_steps` and advances `global_steps` and its micro-step counter as usual.
    Every rank must call it at the same step (the decision is agreed by an all-reduce)."""
    opt = engine.optimizer
    if hasattr(opt, "has_overflow") and hasattr(opt, "check_grad_overflow"):  # ZeRO-1/2
        # The ZeRO optimizer's overflow path frees its gradient partitions and returns.
        patches = {"check_grad_overflow": True, "has_overflow": lambda *a, **k: True}
    elif hasattr(opt, "clear_hp_grads"):  # DeepSpeed's bf16 optimizer

        def drop(closure=None):
            opt.clear_hp_grads()
            opt.clear_lp_grads()
            opt.overflow = True

        patches = {"step": drop}
    else:  # the client's torch optimizer (ZeRO-0 in fp32): the engine zeroes the grads
        patches = {"step": lambda closure=None: None, "overflow": True}
    saved = {k: opt.__dict__[k] for k in patches if k in opt.__dict__}
    skipped_before = engine.skipped_steps
    opt.__dict__.update(patches)
    try:
        assert engine.is_gradient_accumulation_boundary()
        engine.step()
    finally:
        for k in patches:
            if k in saved:
                opt.__dict__[k] = saved[k]
            else:
                del opt.__dict__[k]
    assert engine.skipped_steps == skipped_before + 1 and not engine.was_step_applied()
    engine.__dict__.pop("norm_for_clip", None)  # the dropped step's, never a later one's


# ---- ZeRO tensor fragments ----
def relink_optimizer_fragments(engine) -> None:
    """Point every parameter's fragment at the current flat Adam state.

    DeepSpeed 0.19 links the fragments once, right after stepping the first parameter group,
    before later groups have any state; with several groups (decay / no decay) the later
    groups' moments are then unreachable through the fragment API. Linking again fixes it.
    """
    zero_opt = engine.optimizer
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()


def forget_process_groups() -> None:
    """DeepSpeed caches the process groups it makes (a clone of the world group, the expert
    groups) in module globals that outlive the process group: a run built again in the same
    process after `shutdown()` (a notebook, a test) met "Group ... is not registered". Called
    when the process group is destroyed; nothing to do where DeepSpeed was never imported."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        getattr(groups, name).clear()
