"""Expert choice in training, every group of the layer at once (the hot path of MoMa).

Per group only the selection runs (sigmoid scores, top-C tokens per expert), outside
autograd: it picks indices, which carry no gradient. What does carry one is computed once
for all groups, over the [T, A] logits of all of the layer's A experts: the gates, one
gather and one sigmoid at the chosen (token, expert) pairs; the auxiliary routers' loss,
one weighted binary cross-entropy over [T, A] whose weights give each group's block the
mean of its own (a group's auxiliary router is scored on its own tokens, as MoMa 2.4
trains it). Autograd then records a handful of ops per layer instead of a chain per group
(MoMa 4t4i EC at d=128: 219 aten ops forward and backward instead of 287, on the steps that
do not log statistics; scripts/bench_step.py --profile). The pairs are those of the per-group path
(group_router.py), in the same order: `MoELayer` takes this path where it applies
(`applies`) and the per-group one elsewhere; tests hold the two equal.

Shape legend: T tokens, A experts of all groups, E experts of a group, C tokens per expert,
N chosen pairs (group-major, then expert-major).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mm_moe.model.context import ForwardContext
from mm_moe.model.moe import router


@dataclass
class Choice:
    token_idx_N: torch.Tensor  # positions among the layer's T tokens
    gate_N: torch.Tensor  # fp32
    capacities: list[int]  # per group, the tokens each of its experts took
    chosen_TA: torch.Tensor | None  # fp32, 1 where a (token, expert) pair was chosen


def applies(layer) -> bool:
    """Whether `route` computes this layer's routing: training with expert choice, sigmoid
    scores, and no routing loss that needs each group's logits (load balance, z-loss,
    entropies)."""
    cfg = layer.cfg
    losses = (cfg.load_balance_coef, cfg.router_z_coef, cfg.entropy_local_coef)
    return (
        layer.training
        and hasattr(layer.dispatcher, "runs")  # the experts take the pairs as runs
        and cfg.router == "expert_choice"
        and cfg.score == "sigmoid"
        and not any(losses)
        and not cfg.entropy_global_coef
    )


def route(layer, logits_TA: torch.Tensor, aux_TA: torch.Tensor | None, ctx: ForwardContext):
    """The layer's pairs and gates from its fp32 logits [T, A] (and auxiliary-router logits);
    adds the auxiliary routers' loss and the statistics as the per-group path does (expert
    choice has no expert loads to keep: moe.bias_update_rate is refused with it)."""
    cfg, T = layer.cfg, logits_TA.shape[0]
    token_parts, local_parts, capacities = [], [], []
    with torch.no_grad():  # the selection: indices only
        for group, gr in zip(layer.group_specs, layer.group_routers):
            positions, count = ctx.tokens.group(group.modalities)
            E, off = group.num_experts, gr.offset
            capacity = gr.capacity(count)
            capacities.append(capacity)
            rows = slice(None) if count == T else positions
            _, select_TE = gr.scores(layer, logits_TA[rows, off : off + E])
            _, local_EC = torch.topk(select_TE.t(), capacity, dim=1, sorted=False)
            local_N = local_EC.reshape(-1)
            local_parts.append(local_N)
            token_parts.append(local_N if count == T else positions[local_N])
        token_idx_N = cat_parts(token_parts)
        expert_N, ones_N = _expert_ids(layer, capacities, ctx, logits_TA.device)
        chosen_TA = None
        if cfg.aux_router_coef > 0 or ctx.collect_stats:
            chosen_TA = torch.zeros_like(logits_TA).index_put_((token_idx_N, expert_N), ones_N)
    gate_N = torch.sigmoid(logits_TA[token_idx_N, expert_N])
    if cfg.expert_choice_gate == "normalized":  # a token is in one group: one sum for all
        sum_T = gate_N.new_zeros(T).index_add(0, token_idx_N, gate_N)
        gate_N = gate_N / sum_T[token_idx_N].clamp_min(1e-20)
    if cfg.aux_router_coef > 0:
        weight_TA = _group_means(layer, ctx, T, logits_TA.device)
        bce = F.binary_cross_entropy_with_logits(
            aux_TA, chosen_TA, weight=weight_TA, reduction="sum"
        )
        ctx.add_aux_router_loss("moe/aux_router_bce", cfg.aux_router_coef * bce)
    _add_stats(layer, logits_TA, aux_TA, local_parts, gate_N, chosen_TA, ctx)
    return Choice(token_idx_N, gate_N, capacities, chosen_TA)


def cat_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without a copy for one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _expert_ids(layer, capacities: list[int], ctx: ForwardContext, device):
    """([N] global expert of each pair, [N] fp32 ones): the same for every layer with the
    same groups and capacities, made once per forward (ones as a tensor: a Python scalar
    written into a tensor is a host-data copy on CUDA)."""
    runs = tuple((g.num_experts, C) for g, C in zip(layer.group_specs, capacities))
    key = ("expert_ids", runs)
    if key not in ctx.cache:
        parts, first = [], 0
        for E, C in runs:
            parts.append(torch.arange(first, first + E, device=device).repeat_interleave(C))
            first += E
        expert_N = cat_parts(parts)
        ctx.cache[key] = (expert_N, torch.ones(expert_N.shape, device=device))
    return ctx.cache[key]


def _group_means(layer, ctx: ForwardContext, T: int, device) -> torch.Tensor:
    """[T, A] weights that make a sum over all entries the sum over groups of each group's
    mean over its own block (its tokens, its experts); zero elsewhere. The same for every
    layer with the same groups: made once per forward."""
    key = ("group_means", tuple((g.modalities, g.num_experts) for g in layer.group_specs))
    weight_TA = ctx.cache.get(key)
    if weight_TA is None:
        weight_TA = torch.zeros(T, layer.num_experts, device=device)
        for group, gr in zip(layer.group_specs, layer.group_routers):
            positions, count = ctx.tokens.group(group.modalities)
            if count:
                block_TE = weight_TA[:, gr.offset : gr.offset + group.num_experts]
                block_TE.index_fill_(0, positions, 1.0 / (count * group.num_experts))
        ctx.cache[key] = weight_TA
    return weight_TA


def _add_stats(layer, logits_TA, aux_TA, local_parts, gate_N, chosen_TA, ctx) -> None:
    """Each group's statistics, as the per-group path reports them (group_router.py): the
    host-side pair and token counts on every step, the rest on the steps that log them."""
    start, T = 0, logits_TA.shape[0]
    for group, gr, local_N in zip(layer.group_specs, layer.group_routers, local_parts):
        positions, count = ctx.tokens.group(group.modalities)
        E, off, N = group.num_experts, gr.offset, local_N.numel()
        gr.add_counts(count, N, ctx)
        if ctx.collect_stats:
            rows = slice(None) if count == T else positions
            cols = slice(off, off + E)
            chosen_TE = chosen_TA[rows, cols] > 0
            expert_N = torch.arange(E, device=local_N.device).repeat_interleave(N // E)
            gates_N = gate_N[start : start + N].detach()
            routing = router.Routing(local_N, expert_N, gates_N, chosen_TE, None, N // E)
            gr.add_stats(layer, logits_TA[rows, cols].detach(), routing, ctx)
            if aux_TA is not None:
                gr.add_aux_accuracy(aux_TA[rows, cols].detach(), chosen_TE, ctx)
        start += N
