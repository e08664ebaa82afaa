"""Adam state restored from a checkpoint where torch's own AdamW keeps it.

Checkpoints hold moments on the CPU in fp32. Restored as they are, a CUDA run would meet CPU
tensors in its first step after a resume: fused (and capturable) AdamW keeps `step` on the
parameter's device as an fp32 tensor and reads it inside the kernel (an illegal memory access,
not an error, on CUDA), and every kernel wants the moments on the parameter's device in its
dtype. torch's `Optimizer.load_state_dict` follows the same policy
(`_process_value_according_to_param_policy`); this is it, for state built by name.
"""

from __future__ import annotations

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def step_on_device(group: dict) -> bool:
    """Fused and capturable AdamW read `step` on the parameter's device; the loop on CPU."""
    return bool(group.get("fused") or group.get("capturable"))


def adam_state(
    p: torch.Tensor, group: dict, step: int, moments: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """AdamW state of parameter `p` (of param group `group`) at optimizer step `step`: the
    saved `moments` (zeros where missing) on p's device in p's dtype, `step` fp32 on p's
    device for fused/capturable AdamW, on the CPU otherwise (torch's layout)."""
    moments = moments or {}
    step_device = p.device if step_on_device(group) else torch.device("cpu")
    state = {"step": torch.tensor(float(step), dtype=torch.float32, device=step_device)}
    for k in ADAM_KEYS:
        if k in moments:
            state[k] = moments[k].to(device=p.device, dtype=p.dtype, copy=True)
        else:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """{id(param): its param group}."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}
