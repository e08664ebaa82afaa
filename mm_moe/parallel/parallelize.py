"""`parallelize(model, cfg, dist) -> engine`: every kind of parallelism, applied from outside to
the single-device model, in one place (torchtitan's `parallelize_*`).

    expert parallelism (shard experts, all-to-all dispatcher)   expert_parallel.py
    torch.compile per block (trainer.compile)                    compile.py
    activation checkpointing (trainer.activation_checkpointing)  checkpointing.py
    the optimizer with expert param groups and its LR schedule   (the config's builders)
    the DeepSpeed engine: ZeRO, bf16, accumulation, clipping     here; its workarounds in
                                                                 deepspeed_fixes.py
    ZeRO-0: expert gradients accumulated inside their GEMMs      here
"""

from __future__ import annotations

import logging

import torch

from mm_moe.model.moe.experts import GroupedExperts
from mm_moe.parallel import deepspeed_fixes
from mm_moe.parallel.aux_router_optim import AuxRouterOptimizer, aux_router_parameters
from mm_moe.parallel.checkpointing import apply_activation_checkpointing
from mm_moe.parallel.compile import compile_blocks
from mm_moe.parallel.distributed import DistInfo
from mm_moe.parallel.expert_parallel import grad_norm, shard_experts

log = logging.getLogger("mm_moe")


def deepspeed_config(
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_world_size: int,
    zero_stage: int,
    grad_clip: float,
    bf16: bool,
    overlap_comm: bool = False,
    grad_accum_dtype: str = "auto",
    reduce_bucket_size: int = 500_000_000,
) -> dict:
    """DeepSpeed's config. overlap_comm: the gradient reduction overlaps the backward (on GPU:
    NCCL on its own stream; over gloo on CPU it only adds copies). grad_accum_dtype:
    trainer.grad_accum_dtype (fp32: DeepSpeed's bf16 optimizer accumulates in fp32, and the
    accumulators are reduced in fp32: in bf16, DeepSpeed's default under bf16, the reduction
    rounds them to bf16 even on one process)."""
    gas = global_batch_size // (micro_batch_size * dp_world_size)
    assert gas * micro_batch_size * dp_world_size == global_batch_size
    assert grad_accum_dtype in ("auto", "fp32"), grad_accum_dtype
    data_types = {} if grad_accum_dtype == "auto" else {"grad_accum_dtype": grad_accum_dtype}
    comm_dtype = {} if grad_accum_dtype == "auto" else {"communication_data_type": "fp32"}
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": deepspeed_fixes.zero_stage_for(zero_stage, bf16),
            "contiguous_gradients": True,
            "overlap_comm": overlap_comm,
            "reduce_scatter": True,
            "reduce_bucket_size": reduce_bucket_size,
        },
        "bf16": {"enabled": bf16},
        **({"data_types": data_types} if data_types else {}),
        **comm_dtype,
        # Our AdamW is torch's; DeepSpeed shards its state under ZeRO like its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def deepspeed_config_for(cfg, dist: DistInfo) -> dict:
    """DeepSpeed's config for a TrainConfig on this world: overlap_comm on GPUs unless
    parallel.overlap_comm says otherwise."""
    overlap = cfg.parallel.overlap_comm
    return deepspeed_config(
        global_batch_size=cfg.trainer.global_batch_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        dp_world_size=dist.world_size,
        zero_stage=cfg.parallel.zero_stage,
        grad_clip=cfg.optim.grad_clip,
        bf16=uses_bf16(cfg.trainer.precision, dist.device),
        overlap_comm=dist.device.type == "cuda" if overlap is None else overlap,
        grad_accum_dtype=cfg.trainer.grad_accum_dtype,
        reduce_bucket_size=cfg.parallel.reduce_bucket_size,
    )


def uses_bf16(precision: str, device: torch.device) -> bool:
    """trainer.precision: auto is bf16 on CUDA, fp32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def parallelize(model: torch.nn.Module, cfg, dist: DistInfo):
    """The DeepSpeed engine over `model` (on `dist.device`) for a TrainConfig `cfg`:
    `engine.module` is the model (its experts sharded at EP > 1, its blocks compiled with
    trainer.compile), `engine.lr_scheduler` the LR schedule, `engine.aux_routers` the
    auxiliary routers' own optimizer (None without them). Collective: every rank calls it."""
    import deepspeed

    deepspeed_fixes.check_version()
    expert_parallel = shard_experts(model, cfg.parallel, dist.device)
    if cfg.trainer.compile:
        compile_blocks(model)
    # After compile: recompute wraps the compiled call (checkpointing.py says why).
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    aux_params = aux_router_parameters(model).values()
    optimizer = cfg.optim.build(model, exclude=aux_params, router_lr_scale=cfg.moe.router_lr_scale)
    if expert_parallel is not None:
        deepspeed_fixes.split_moe_param_groups(optimizer)
    scheduler = cfg.optim.build_schedule(optimizer, cfg.trainer.max_steps)
    ds_config = deepspeed_config_for(cfg, dist)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    buffers = deepspeed_fixes.float_buffers(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    deepspeed_fixes.restore_float_buffers(model, buffers)
    deepspeed_fixes.skip_lone_allreduce(engine)
    deepspeed_fixes.run_backward_prologue(engine)
    fuse_expert_grad_accumulation(model, engine)
    if cfg.trainer.grad_accum_dtype != "auto":
        log.info(
            "gradient accumulation in %s (trainer.grad_accum_dtype): %s",
            cfg.trainer.grad_accum_dtype,
            type(engine.optimizer).__name__,
        )
    if expert_parallel is not None:
        expert_parallel.check_deepspeed_groups()
    deepspeed_fixes.clip_with_step_norm(engine, grad_norm)
    # Trained apart from the engine (its clip, its bf16): aux_router_optim.py says why.
    engine.aux_routers = (
        AuxRouterOptimizer(model, cfg.optim, cfg.trainer.max_steps) if aux_params else None
    )
    return engine


def fuse_expert_grad_accumulation(model: torch.nn.Module, engine) -> int:
    """Let the experts add their weight gradients into `.grad` inside their backward GEMMs
    (`GroupedExperts.accumulate_grads`) where the engine reads `.grad` and nothing else: ZeRO-0
    with the torch optimizer, over more than one micro-batch per step (with one, there is
    nothing to accumulate into). ZeRO-1/2 and DeepSpeed's bf16 optimizer move each gradient out
    of `.grad` in a hook on its accumulation, which must fire. Returns how many expert modules
    do."""
    if not deepspeed_fixes.plain_zero0(engine) or engine.gradient_accumulation_steps() < 2:
        return 0
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for m in experts:
        m.accumulate_grads = True
    if experts:
        log.info("expert weight gradients accumulate inside their backward GEMMs (ZeRO-0)")
    return len(experts)


def unsharded_grad_norm(engine) -> torch.Tensor | None:
    """See deepspeed_fixes.unsharded_grad_norm; under expert parallelism every expert counts
    once."""
    return deepspeed_fixes.unsharded_grad_norm(engine, grad_norm)
