"""Whole (unsharded) model and optimizer state, gathered from and scattered to ZeRO shards.

The engine's state crosses to checkpoint/ through one pair of calls: `local_state(engine)` hands
it over and `load_local_state(engine, state)` takes it back, as one plain {name: tensor} dict
(names in state_names.py). What that dict becomes on disk (files, experts one entry each, older
layouts) is mm_moe.checkpoint's business; nothing here knows it.

Tensors are whole, keyed by parameter name, so they load at any world size, ZeRO stage and
expert-parallel size. Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) each rank
owns a slice of the fp32 master weights and Adam moments: DeepSpeed's tensor-fragment API
assembles a whole tensor with one all-reduce per parameter (over the expert-data-parallel group
for expert parameters) and writes back only the local slice. Under expert parallelism a rank
holds only its experts: gathering puts the stacked experts of every rank, in global expert id
order, on rank 0 only (the writer; other ranks get no entry for them); loading takes the whole
global stack and keeps this rank's rows.

Every function here is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from mm_moe.errors import UserError
from mm_moe.parallel.adam_state import ADAM_KEYS, adam_state
from mm_moe.parallel.deepspeed_fixes import relink_optimizer_fragments
from mm_moe.parallel.expert_parallel import ExpertParallelMoELayer, sharded_experts
from mm_moe.parallel.state_names import MODEL, OPTIMIZER, STEP


def _gather_experts(local: torch.Tensor, layer: ExpertParallelMoELayer) -> torch.Tensor | None:
    """This rank's expert rows -> every expert in global id order, on rank 0; None elsewhere."""
    ep = layer.expert_parallel
    if 0 not in dist.get_process_group_ranks(ep.ep_group):
        return None  # only rank 0's expert-parallel group holds what rank 0 writes
    is_dst = dist.get_rank() == 0
    parts = [torch.empty_like(local) for _ in range(ep.ep_size)] if is_dst else None
    dist.gather(local.contiguous(), parts, dst=0, group=ep.ep_group)
    if not is_dst:
        return None
    whole = local.new_empty((layer.placement.num_experts, *local.shape[1:]))
    for r, part in enumerate(parts):
        whole[layer.placement.local_experts(r)] = part
    return whole


def _local_experts(value: torch.Tensor, layer: ExpertParallelMoELayer) -> torch.Tensor:
    """This rank's rows of a whole stack; a stack of this rank's experts alone (as checkpoint/
    reads them, by `GroupedExperts.global_ids`) as it is: at EP > 1 it has fewer rows."""
    if value.shape[0] != layer.placement.num_experts:
        return value
    return value[layer.experts.global_ids]


def _is_sharded(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "_hp_mapping")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _optimizer_step(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def gather_model(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """fp32 master weights (or the module's own when unsharded), on CPU; with `keep` false
    this rank only takes part in the collectives and keeps nothing (not the writer)."""
    out = {}
    experts = sharded_experts(engine.module)
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if _is_sharded(p) else p.detach().float()
        if name in experts:
            full = _gather_experts(full, experts[name])
        if full is not None and keep:
            out[name] = full.detach().cpu().clone()
    for name, buf in engine.module.named_buffers():
        if name in engine.module.state_dict() and keep:
            out[name] = buf.detach().cpu().clone()
    return out


def gather_optimizer(engine, keep: bool = True) -> dict:
    """Adam moments of every parameter, whole, plus the step count; empty before any step.
    With `keep` false: the collectives only, no moments kept."""
    step = _optimizer_step(engine)
    if step == 0:
        return {}
    relink_optimizer_fragments(engine)
    base = _base_optimizer(engine)
    experts = sharded_experts(engine.module)
    aux = getattr(engine, "aux_routers", None)
    aux_moments = aux.moments() if aux is not None else {}
    moments = aux_moments if keep else {}  # the collectives below run on every rank all the same
    for name, p in engine.module.named_parameters():
        if name in aux_moments:  # the auxiliary routers' own optimizer holds them
            continue
        per_key = {}
        for k in ADAM_KEYS:
            full = safe_get_full_optimizer_state(p, k) if _is_sharded(p) else base.state[p][k]
            if name in experts:
                full = _gather_experts(full.float(), experts[name])
            if full is not None and keep:
                per_key[k] = full.detach().float().cpu().clone()
        if per_key:
            moments[name] = per_key
    return {"step": step, "moments": moments}


def _check_names(saved: dict, engine, what: str, path: str) -> None:
    names = {n for n, _ in engine.module.named_parameters()}
    missing, unexpected = names - set(saved), set(saved) - names - set(engine.module.state_dict())
    if missing or unexpected:
        raise UserError(
            f"{what} in {path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was it saved from another model config?"
        )


def _local_value(value, name: str, p, experts: dict, what: str, path: str) -> torch.Tensor:
    """The saved whole tensor cut to this rank's experts, checked against the parameter."""
    if name in experts:
        value = _local_experts(value, experts[name])
    if value.shape != p.shape:
        raise UserError(
            f"{path}: {what} has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}"
        )
    return value


@torch.no_grad()
def load_model(engine, state: dict[str, torch.Tensor], path: str = "checkpoint") -> None:
    _check_names(state, engine, "model state", path)
    experts = sharded_experts(engine.module)
    for name, p in engine.module.named_parameters():
        value = _local_value(state[name], name, p, experts, f"parameter {name}", path)
        p.data.copy_(value.to(p.device, p.dtype))
        if _is_sharded(p):
            safe_set_full_fp32_param(p, value.to(p.device, torch.float32))
    params = dict(engine.module.named_parameters())
    for name, buf in engine.module.named_buffers():
        if name in state and name not in params:
            buf.copy_(state[name].to(buf.device, buf.dtype))


def _init_base_state(engine, step: int) -> None:
    """Create Adam state (zeros, given step) so moments can be written before the first step;
    on each parameter's device and in its dtype, `step` where fused AdamW reads it."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for p in group["params"]:
            base.state[p] = adam_state(p, group, step)
    relink_optimizer_fragments(engine)


@torch.no_grad()
def load_optimizer(engine, state: dict, path: str = "checkpoint") -> None:
    if not state:
        return
    _check_names(state["moments"], engine, "optimizer state", path)
    _init_base_state(engine, state["step"])
    base = _base_optimizer(engine)
    experts = sharded_experts(engine.module)
    aux = getattr(engine, "aux_routers", None)
    if aux is not None:
        aux.load_moments(state["moments"], state["step"])
    for name, p in engine.module.named_parameters():
        if aux is not None and name in aux.params:
            continue
        for k in ADAM_KEYS:
            what = f"optimizer state {k} of {name}"
            value = _local_value(state["moments"][name][k], name, p, experts, what, path)
            if _is_sharded(p):
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), k)
            else:
                base.state[p][k] = value.to(device=p.device, dtype=p.dtype, copy=True)


def local_state(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """The engine's model and optimizer state as one {name: tensor} dict (state_names.py),
    fresh CPU copies that alias nothing live. Collective; expert rows land on rank 0 only.
    `keep` false (a rank that writes nothing): the collectives only, no host copy of the
    model (every rank holding one would take a node's memory times its GPUs)."""
    out = {MODEL + name: value for name, value in gather_model(engine, keep).items()}
    optim = gather_optimizer(engine, keep)
    if optim:
        out[STEP] = torch.tensor(optim["step"], dtype=torch.int64)
        for name, per_key in optim["moments"].items():
            out.update({f"{OPTIMIZER}{name}/{k}": v for k, v in per_key.items()})
    return out


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """`local_state`'s dict -> (model {name: tensor}, optimizer {"step", "moments"} or {})."""
    model, moments = {}, {}
    for key, value in state.items():
        if key.startswith(MODEL):
            model[key[len(MODEL) :]] = value
        elif key != STEP and key.startswith(OPTIMIZER):
            name, _, k = key[len(OPTIMIZER) :].rpartition("/")
            moments.setdefault(name, {})[k] = value
        else:
            assert key == STEP, f"not a name of local_state's: {key}"
    optim = {"step": int(state[STEP]), "moments": moments} if STEP in state else {}
    return model, optim


def load_local_state(engine, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Put a `local_state` dict (whole tensors, this run's parameter names) into the engine:
    each rank keeps its slice and its experts' rows, on the parameter's device and in its
    dtype. Without optimizer entries the optimizer stays as it is. `source` names where the
    tensors came from in errors (a name or shape the model does not have). Collective."""
    model, optim = _split(state)
    load_model(engine, model, source)
    load_optimizer(engine, optim, source)
