"""Save and load the whole training state: model, optimizer, LR schedule, RNG states, data
position, step and the resolved config.

Tensors are stored whole (see mm_moe.parallel.full_state), and every expert once under its global
identity (see mm_moe.checkpoint.experts), so a checkpoint loads at any world size, ZeRO stage and
expert-parallel size. Files are read with torch.load(weights_only=True): loading never runs code.

Format 2 stores experts one per entry (`layers.3.ffn.experts.image.1.w_gate_up`); format 1
(stacked `layers.3.ffn.experts.w_gate_up`, world-size independent but without expert
parallelism) still loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mm_moe.checkpoint import experts, layout, rng
from mm_moe.parallel import full_state
from mm_moe.parallel.distributed import barrier

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _gather_to_main(obj, world_size: int, rank: int) -> list | None:
    if world_size == 1:
        return [obj]
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def save(
    root: Path,
    step: int,
    engine,
    scheduler,
    loader,
    config: dict,
    rank: int,
    world_size: int,
    keep_last: int,
    extra: dict | None = None,
) -> Path:
    """Collective: every rank calls it; rank 0 writes. Returns the step directory."""
    model_state = full_state.gather_model(engine)
    optim_state = full_state.gather_optimizer(engine)
    rng_states = _gather_to_main(rng.capture(), world_size, rank)
    final = root / layout.step_dir_name(step)
    if rank == 0:
        keys = experts.expert_keys(engine.module)
        model_state = experts.split_experts(model_state, keys)
        if optim_state:
            optim_state["moments"] = experts.split_experts(optim_state["moments"], keys)
        tmp = layout.new_tmp_dir(root, step)
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({"ranks": rng_states}, tmp / "rng.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "expert_parallel_size": _expert_parallel_size(engine),
            "scheduler": scheduler.state_dict(),
            "data": loader.state_dict(),
            **(extra or {}),
        }
        # meta.json is written last: a step directory with it is complete.
        (tmp / layout.META).write_text(json.dumps(meta, indent=1))
        layout.publish(root, tmp, step)
        layout.prune(root, keep_last)
    barrier()
    return final


def _load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(
            f"cannot load {path}: {exc.__class__.__name__}: {exc}. Checkpoint files must hold "
            "only tensors and plain values (they are read with weights_only=True)"
        ) from exc


def _expert_parallel_size(engine) -> int:
    from mm_moe.parallel.expert_parallel import expert_parallel_of

    ep = expert_parallel_of(engine.module)
    return ep.ep_size if ep is not None else 1


def _load_scheduler(scheduler, state: dict, path: str) -> None:
    """Restore the LR schedule. Expert parallelism puts experts in their own optimizer param
    groups, so the number of groups can differ from the saving run's: every group follows
    the same schedule, so one saved value stands for all of them."""
    state = dict(state)
    n = len(scheduler.optimizer.param_groups)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        values = state.get(key)
        if values is None or len(values) == n:
            continue
        if len({json.dumps(v) for v in values}) != 1:
            raise ValueError(
                f"{path}: the LR schedule has {len(values)} parameter groups with different "
                f"learning rates; this run has {n} groups"
            )
        state[key] = [values[0]] * n
    scheduler.load_state_dict(state)


def load(step_dir: Path, engine, scheduler, loader, rank: int, world_size: int) -> dict:
    """Collective under ZeRO. Restores everything `save` wrote; returns the meta dict."""
    meta = json.loads((step_dir / layout.META).read_text())
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{step_dir}: checkpoint format {meta.get('format_version')} is not "
            f"supported (this version reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    keys = experts.expert_keys(engine.module)
    model_state = experts.stack_experts(_load_tensors(step_dir / "model.pt"), keys, str(step_dir))
    full_state.load_model(engine, model_state, str(step_dir))
    optim_state = _load_tensors(step_dir / "optimizer.pt")
    if optim_state:
        optim_state["moments"] = experts.stack_experts(optim_state["moments"], keys, str(step_dir))
    full_state.load_optimizer(engine, optim_state, str(step_dir))
    _load_scheduler(scheduler, meta["scheduler"], str(step_dir))
    # The optimizer reads its lr from param_groups, which the schedule set before the save.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    loader.load_state_dict(meta["data"])
    rng_states = _load_tensors(step_dir / "rng.pt")["ranks"]
    if meta["world_size"] == world_size:
        rng.restore(rng_states[rank])
    else:
        # Per-rank RNG streams cannot be mapped to another world size; reseed deterministically.
        log.warning(
            "checkpoint saved at world size %d, resuming at %d: RNG states reseeded",
            meta["world_size"],
            world_size,
        )
        rng.seed_all(meta["step"] * 1_000_003 + rank)
    engine.global_steps = meta["step"]
    return meta
