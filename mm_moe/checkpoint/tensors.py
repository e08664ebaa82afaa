"""A checkpoint's tensors <-> the engine's state by name: the one place that reads model.pt and
optimizer.pt, upgrades older layouts (compat.py) and maps experts between their on-disk
entries (one per expert, experts.py) and the model's stacked parameters.

The engine side is a plain {name: tensor} dict, as mm_moe.parallel.full_state hands it over
(`local_state`) and takes it back (`load_local_state`); its names are spelled in
mm_moe.parallel.state_names. On disk (unchanged since format 2):

    model.pt       {parameter or buffer name: tensor}, experts one entry each
    optimizer.pt   {"step": int, "moments": {parameter name: {exp_avg, exp_avg_sq}}}, experts
                   one entry each; {} when saved before the first optimizer step
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mm_moe.checkpoint import compat, experts, layout
from mm_moe.parallel.state_names import MODEL, OPTIMIZER, STEP


def to_files(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, dict]:
    """The engine's state (rank 0's: every expert) -> (model.pt's dict, optimizer.pt's)."""
    keys = experts.expert_keys(model)
    weights, moments = {}, {}
    for key, value in state.items():
        if key.startswith(MODEL):
            weights[key[len(MODEL) :]] = value
        elif key != STEP:
            name, _, k = key[len(OPTIMIZER) :].rpartition("/")
            moments.setdefault(name, {})[k] = value
    optimizer = {}
    if STEP in state:
        optimizer = {"step": int(state[STEP]), "moments": experts.split_experts(moments, keys)}
    return experts.split_experts(weights, keys), optimizer


def read_model(step_dir: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """model.pt in `model`'s names and shapes: experts stacked (under expert parallelism the
    rank's own only: `experts.expert_rows`), older layouts upgraded."""
    saved = layout.read_tensors(Path(step_dir) / "model.pt")
    keys, rows = experts.expert_keys(model), experts.expert_rows(model)
    weights = experts.stack_experts(saved, keys, str(step_dir), rows)
    return compat.upgrade_model_state(weights, model)


def read_moments(step_dir: Path, model: nn.Module) -> tuple[int, dict] | None:
    """optimizer.pt as (step, {parameter name: {exp_avg, exp_avg_sq}}) in `model`'s shapes;
    None when it was saved before the first optimizer step."""
    saved = layout.read_tensors(Path(step_dir) / "optimizer.pt")
    if not saved:
        return None
    keys, rows = experts.expert_keys(model), experts.expert_rows(model)
    moments = experts.stack_experts(saved["moments"], keys, str(step_dir), rows)
    return int(saved["step"]), compat.upgrade_moments(moments, model)


def read(step_dir: Path, model: nn.Module, optimizer: bool = True) -> dict[str, torch.Tensor]:
    """A step's tensors as the engine's state of `model` (for `load_local_state`): its weights
    and, with `optimizer`, its Adam moments and step count when it has them."""
    state = {MODEL + name: value for name, value in read_model(step_dir, model).items()}
    found = read_moments(step_dir, model) if optimizer else None
    if found is not None:
        step, moments = found
        state[STEP] = torch.tensor(step, dtype=torch.int64)
        for name, per_key in moments.items():
            state.update({f"{OPTIMIZER}{name}/{k}": v for k, v in per_key.items()})
    return state
