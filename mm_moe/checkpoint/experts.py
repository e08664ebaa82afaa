"""Experts on disk: one entry per expert under its global identity (layer, modality group,
expert index), so a checkpoint loads at any expert-parallel size.

In memory an MoE layer stacks its experts (`<layer>.experts.w_gate_up` [E, d, 2h],
`<layer>.experts.w_down` [E, h, d], global id order: `MoEConfig.groups()` order, text then
image, or one `mixed` group). On disk (format 2) each stack is split into

    <layer>.experts.<group>.<index>.w_gate_up    [d, 2h]
    <layer>.experts.<group>.<index>.w_down       [h, d]

e.g. `layers.3.ffn.experts.image.1.w_gate_up`, in model.pt, and with the same keys for the Adam
moments in optimizer.pt. Everything else keeps its parameter name.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_moe.errors import UserError
from mm_moe.model.moe.layer import MoELayer

EXPERT_PARAMS = ("w_gate_up", "w_down")


def expert_keys(model: nn.Module) -> dict[str, list[str]]:
    """{stacked parameter name: the per-expert keys of its rows, in global id order}."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, MoELayer):
            for w in EXPERT_PARAMS:
                out[f"{prefix}.experts.{w}"] = [
                    f"{prefix}.experts.{group.name}.{i}.{w}"
                    for group in m.group_specs
                    for i in range(group.num_experts)
                ]
    return out


def expert_rows(model: nn.Module) -> dict[str, list[int]]:
    """{stacked parameter name: the global expert ids of its rows} where a layer holds only
    some experts (expert parallelism sets `GroupedExperts.global_ids`); a rank then reads only
    those from a checkpoint, not a copy of every expert."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, MoELayer) and m.experts.global_ids is not None:
            for w in EXPERT_PARAMS:
                out[f"{prefix}.experts.{w}"] = list(m.experts.global_ids)
    return out


def _map_tensors(value, fn):
    """Apply fn to a tensor, or to each tensor of a {name: tensor} dict (Adam moments)."""
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return fn(value)


def split_experts(state: dict, keys: dict[str, list[str]]) -> dict:
    """Stacked expert entries -> one entry per expert; other entries unchanged."""
    out = {}
    for name, value in state.items():
        if name not in keys:
            out[name] = value
            continue
        for e, key in enumerate(keys[name]):
            out[key] = _map_tensors(value, lambda t, e=e: t[e].clone())
    return out


def stack_experts(
    state: dict, keys: dict[str, list[str]], path: str, rows: dict[str, list[int]] | None = None
) -> dict:
    """One entry per expert -> stacked entries (the inverse of `split_experts`). `rows`: for
    a stacked name, the global expert ids to stack (a rank's own under expert parallelism),
    so that no rank builds every expert's copy; all of them otherwise."""
    out = dict(state)
    rows = rows or {}
    for name, per_expert in keys.items():
        missing = [k for k in per_expert if k not in out]
        if missing:
            if name in out:  # already stacked
                if name in rows:
                    out[name] = _map_tensors(out[name], lambda t, r=rows[name]: t[r])
                continue
            raise UserError(
                f"{path}: no entry for experts {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                "was it saved with other moe.experts_per_modality / moe.granularity?"
            )
        values = [out.pop(k) for k in per_expert]
        if name in rows:
            values = [values[e] for e in rows[name]]
        if isinstance(values[0], dict):
            out[name] = {k: torch.stack([v[k] for v in values]) for k in values[0]}
        else:
            out[name] = torch.stack(values)
    return out
