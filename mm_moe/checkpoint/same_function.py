"""Which model and MoE config fields change the function a checkpoint's weights compute, and
the differences between a checkpoint's and this run's.

Derived from the dataclasses, not listed by hand: every field of `ModelConfig` (nested ones
such as `model.mod.*` included) and of `MoEConfig` is compared, except the fields in
`NOT_FUNCTION`, which only steer training (losses, noise, initialisation, learning rates) or
speed (kernels) and leave the forward pass of given weights as it is. A field added later is
compared until someone argues it into the allow-list.
"""

from __future__ import annotations

import dataclasses

NOT_FUNCTION = {
    # training-only: loss terms, noise and initialisation of weights that the load replaces
    "model.z_loss",
    "model.init_std",
    "model.mod.aux_router_coef",
    "moe.router_noise",
    "moe.router_noise_anneal_steps",
    "moe.router_lr_scale",
    "moe.router_init",
    "moe.load_balance_coef",
    "moe.router_z_coef",
    "moe.entropy_local_coef",
    "moe.entropy_global_coef",
    "moe.aux_router_coef",
    "moe.top1_straight_through",  # the gradient of a top-1 gate of value 1, not its value
    # training-time selection: expert choice's top-C per expert and token choice's drops
    # apply in training only (evaluation and sampling route by the auxiliary routers, or
    # dropless), as does mixture-of-depths' top-k per sequence: a fine-tune may change them
    "moe.capacity_factor",
    "model.mod.capacity",
    # logging and speed only
    "moe.health_stats",
    "moe.gemm",
    "model.attention",
    # a limit, not a change: RoPE is computed for any position
    "model.max_seq_len",
    # compared through the derived `model.ffn_dim` (0 derives it from ffn_multiple_of)
    "model.ffn_hidden",
    "model.ffn_multiple_of",
}

# Fields whose value only matters through a derived one: the expert bias of aux-loss-free
# balancing is added at selection whenever its update rate is > 0; the rate itself is training.
_COMPARED_AS = {"moe.bias_update_rate": lambda rate: rate > 0}
# Lists that name a set (of layers, of untied parts): the order they are written in changes
# nothing.
_SETS = {"model.untie", "moe.layers", "model.mod.layers"}
# Changes that keep the function in one direction, (checkpoint, this run) -> same: turning
# aux-loss-free balancing on adds a bias that was never moved (zeros); turning it off would
# drop a learned one.
_ONE_WAY = {"moe.bias_update_rate": lambda saved, run: not saved and bool(run)}
# Fields that steer training alone under some configs: expert choice's top_k only scales its
# capacity (evaluation and sampling route by the auxiliary routers), as capacity_factor does.
_TRAINING_ONLY_WHEN = {"moe.top_k": lambda moe: moe.router == "expert_choice"}
# The key that turns a part on: off, none of its other fields matter.
_OFF = {"moe": "experts_per_modality", "model.mod": "layers"}
# Properties that stand for allow-listed fields.
_DERIVED = {"model": ("ffn_dim",)}


def function_fields(cfg, prefix: str) -> dict[str, object]:
    """{dotted key: value} of every field of `cfg` (a config dataclass) that changes the
    function, nested dataclasses flattened. A part that is off (no experts, no
    mixture-of-depths layers) has only its on/off key: its other fields do nothing."""
    off = _OFF.get(prefix)
    if off is not None and not getattr(cfg, off):
        return {f"{prefix}.{off}": getattr(cfg, off)}
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}.{f.name}", getattr(cfg, f.name)
        if key in NOT_FUNCTION or (key in _TRAINING_ONLY_WHEN and _TRAINING_ONLY_WHEN[key](cfg)):
            continue
        if dataclasses.is_dataclass(value):
            out.update(function_fields(value, key))
        else:
            out[key] = value
    for name in _DERIVED.get(prefix, ()):
        out[f"{prefix}.{name}"] = getattr(cfg, name)
    return out


def differences(saved: dict[str, object], run: dict[str, object]) -> list[str]:
    """'key: checkpoint A, this run B' for each key whose values differ."""
    # A part on in one and off in the other (a dense checkpoint, an MoE run): its switch says
    # it all; the fields only the side with the part has are not listed one by one.
    switched = [
        prefix
        for prefix, on in _OFF.items()
        if bool(saved.get(f"{prefix}.{on}")) != bool(run.get(f"{prefix}.{on}"))
    ]
    out = []
    for key in sorted(set(saved) | set(run)):
        one_side = (key in saved) != (key in run)
        if one_side and any(key.startswith(f"{prefix}.") for prefix in switched):
            continue
        was, now = _as(key, saved.get(key)), _as(key, run.get(key))
        if was != now and not (key in _ONE_WAY and _ONE_WAY[key](was, now)):
            out.append(f"{key}: checkpoint {_shown(saved, key)}, this run {_shown(run, key)}")
    return out


def _shown(config: dict, key: str) -> str:
    # A key one side leaves out is unused there (top_k under expert choice), not None.
    return repr(config[key]) if key in config else "(not used)"


def _as(key: str, value):
    if key in _SETS and isinstance(value, list | tuple):
        return sorted(value)
    return _COMPARED_AS[key](value) if key in _COMPARED_AS and value is not None else value
