"""Configs saved by older versions, in today's keys.

A checkpoint's `config.yaml` is read back with today's schema (`load_pretrained`, `generate`,
export, the upcycle): a key that was renamed since would be refused as unknown, so it is
renamed here first. User YAML is not upgraded: there a renamed key fails with the schema's
"did you mean" error, which names the new key.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _peak_flops(trainer: dict) -> None:
    # trainer.peak_flops (FLOP/s) became trainer.peak_tflops (TFLOP/s).
    if "peak_flops" in trainer:
        value = trainer.pop("peak_flops")
        trainer.setdefault("peak_tflops", float(value or 0.0) / 1e12)


def _moe_no_effect(moe: dict) -> list[str]:
    """MoE keys that change nothing for this routing (refused in a config since; see
    MoEConfig._check_routing_no_effect)."""
    if not moe.get("experts_per_modality"):
        return []
    router = moe.get("router", "expert_choice")
    k = moe.get("top_k", 1) * moe.get("granularity", 1)
    top1_renormalized = router == "token_choice" and moe.get("renormalize", True) and k == 1
    keys = [] if top1_renormalized else ["top1_straight_through"]
    if moe.get("router_logits", "linear") == "linear":
        keys.append("cosine_router_scale")
    if router == "token_choice":
        keys += ["aux_router_hidden", "aux_router_coef"]
    return keys


def _no_effect_to_defaults(out: dict) -> None:
    """Keys a run from before saved with values that changed nothing, which a config now
    refuses: dropped (the defaults apply), so its checkpoint still loads, to the same function.
    model.untie's `ffn` where every layer is an MoE layer is dropped likewise."""
    moe, model = out.get("moe"), out.get("model")
    dropped = []
    if isinstance(moe, dict):
        for key in _moe_no_effect(moe):
            if key in moe:
                dropped.append(f"moe.{key}")
                moe.pop(key)
    if not isinstance(model, dict):
        return
    mod = model.get("mod")
    if isinstance(mod, dict) and not mod.get("layers"):
        model["mod"] = {k: v for k, v in mod.items() if k == "layers"}
        dropped += [f"model.mod.{k}" for k in mod if k != "layers"]
    moe, n_layers = moe if isinstance(moe, dict) else {}, model.get("n_layers")
    layers = moe.get("layers", "all")
    every = layers == "all" or bool(n_layers) and set(range(n_layers)) <= set(layers)
    if moe.get("experts_per_modality") and every and "ffn" in (model.get("untie") or []):
        model["untie"] = [part for part in model["untie"] if part != "ffn"]
        dropped.append("model.untie's ffn")
    if dropped:
        log.debug("saved config: %s changed nothing; the defaults apply", ", ".join(dropped))


def upgrade_saved_config(values: dict) -> dict:
    """A saved config's dict with older keys renamed to today's, and keys that changed
    nothing (refused in a config since) dropped (a new dict)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    if isinstance(out.get("trainer"), dict):
        _peak_flops(out["trainer"])
    _no_effect_to_defaults(out)
    return out
