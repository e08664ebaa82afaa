"""Aux-loss-free load balancing (DeepSeek-V3): move each expert's selection bias towards equal
load, once per optimizer step, from loads summed over every data-parallel rank so replicas stay
identical."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mm_moe.model.moe.layer import MoELayer


@torch.no_grad()
def update_expert_biases(model: nn.Module, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
    for layer in model.modules():
        if not isinstance(layer, MoELayer) or layer.cfg.bias_update_rate <= 0:
            continue
        load_E = all_reduce_sum(layer.load_accum.clone())
        for group in layer.group_specs:
            off = layer.offsets[group.name]
            n = group.num_experts
            group_load = load_E[off : off + n]
            # A group that saw no token has zero error (sign 0): no host-side test needed.
            error = group_load.mean() - group_load  # > 0: under-loaded, raise its bias
            layer.expert_bias[off : off + n] += layer.cfg.bias_update_rate * error.sign()
        layer.load_accum.zero_()
