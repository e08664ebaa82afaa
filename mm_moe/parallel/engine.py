"""DeepSpeed engine glue: the config we hand DeepSpeed and the engine it returns."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mm_moe")


def deepspeed_config(
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_world_size: int,
    zero_stage: int,
    grad_clip: float,
    bf16: bool,
) -> dict:
    gas = global_batch_size // (micro_batch_size * dp_world_size)
    assert gas * micro_batch_size * dp_world_size == global_batch_size
    if bf16 and zero_stage == 0:
        # DeepSpeed 0.19's ZeRO-0 bf16 path (FP16_UnfusedOptimizer) keeps its fp32 master
        # weights apart from the parameters and leaves expert gradients out of its clipping
        # norm; its ZeRO-1 optimizer has neither problem and, at one rank per data-parallel
        # group, shards nothing.
        log.warning(
            "trainer.precision=bf16 with parallel.zero_stage=0: using DeepSpeed's ZeRO-1 bf16 "
            "optimizer (fp32 master weights, optimizer state sharded over data-parallel ranks)"
        )
        zero_stage = 1
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": bf16},
        # Our AdamW is torch's; DeepSpeed shards its state under ZeRO like its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer, lr_scheduler, ds_config: dict):
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    from mm_moe.parallel.expert_parallel import expert_parallel_of, fix_engine

    ep = expert_parallel_of(model)
    if ep is not None:
        fix_engine(engine, ep)
    return engine


def unsharded_grad_norm(engine) -> float | None:
    """Global grad norm before clipping when gradients are whole on every rank (ZeRO-0 in
    fp32, where DeepSpeed clips without keeping the norm); None when the ZeRO/bf16 optimizer
    computes it. Under expert parallelism every expert counts once. Call after the last
    backward of a step, before `engine.step()`."""
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    if getattr(engine, "clips_with_expert_parallel_norm", False) and engine.gradient_clipping():
        return None  # the clipping computes it (expert_parallel.fix_engine)
    from mm_moe.parallel.expert_parallel import grad_norm

    return float(grad_norm(engine.module))


def last_grad_norm(engine) -> float:
    """Global grad norm of the last optimizer step, as the ZeRO/bf16 optimizer computed it."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def local_grads_finite(engine) -> bool:
    """Whether the gradients this rank holds at the accumulation boundary (after the last
    backward, before `engine.step()`) are all finite: its ZeRO-1/2 partition of the reduced
    gradients, the bf16 optimizer's fp32 accumulators, or the whole reduced `.grad`s (ZeRO-0).
    A non-finite value on any rank reaches at least one rank's share after the reduction."""
    opt = engine.optimizer
    if hasattr(opt, "has_overflow_partitioned_grads_serial"):  # ZeRO-1/2
        return not bool(opt.has_overflow_partitioned_grads_serial().item())
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    grads += list(getattr(opt, "fp32_groups_gradient_flat_partition", []))  # bf16 optimizer
    if not grads:
        return True
    # One fused norm per tensor instead of a Python loop of checks: a norm is finite iff every
    # element is (or overflows fp32, which is no update to take either).
    return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


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
    elif hasattr(opt, "clear_hp_grads"):  # DeepSpeed's bf16 optimizer (ZeRO-0 in bf16)

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
