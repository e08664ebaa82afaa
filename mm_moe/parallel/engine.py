"""DeepSpeed engine glue: the config we hand DeepSpeed and the engine it returns."""

from __future__ import annotations

import logging

import torch


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
