"""Dropless token choice, every group of the layer at once (MoMa with token choice).

A token is in one group and picks its top-k among that group's experts. Over the [V, A]
logits of the V routed tokens (group-major, as the per-group path orders them) and all of the
layer's A experts, a mask of -inf outside each token's own group block makes every row-wise
op a per-group one: softmax or sigmoid scores, top-k, gates and the routing losses (each
group's mean turned into one weighted sum, with weights made once per forward). Autograd then
records one chain per layer instead of one per group (MoMa 4t4i TC at d=128: see
scripts/bench_step.py --profile). `MoELayer` takes this path where it applies (`applies`)
and the per-group one (group_router.py) elsewhere; tests hold the two equal. (Where a token's
scores tie exactly, e.g. saturated sigmoids, top-k over a wider row may pick another of the tied
experts than the per-group path: both are top-k selections.)

Shape legend: T tokens, V routed (valid) tokens, A experts of all groups, E experts of a group,
K experts per token, N pairs (V * K, token-major).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_moe.model.context import ForwardContext
from mm_moe.model.moe import losses, router
from mm_moe.model.moe.batched_choice import cat_parts


@dataclass
class Plan:
    """What depends only on the groups' sizes, the same for every layer of a forward."""

    rows_V: torch.Tensor | None  # positions of the routed tokens, group-major; None: all, in order
    mask_VA: torch.Tensor  # 0 on each token's own group's experts, -inf elsewhere
    token_idx_N: torch.Tensor  # each pair's token (position among the T)
    slot_N: torch.Tensor  # each pair's slot, token * K + j (the combine's fused gather-sum)
    inv_count_V: torch.Tensor  # 1 / its group's token count: a sum of these is a group mean
    balance_A: torch.Tensor  # E / (k T^2) of the column's group: the Switch loss's scale
    inv_count_A: torch.Tensor  # 1 / its group's token count, per column
    spans: list[tuple[int, int]]  # (first row, rows) of each group among the V


def applies(layer) -> bool:
    """Whether `route` computes this layer's routing: dropless token choice (a fanout: the
    layer's own test; evaluation is always dropless) without router noise (whose draws are
    per group)."""
    noisy = layer.training and layer.cfg.router_noise * layer.noise_scale > 0
    return bool(layer.fanout()) and not noisy


def route(layer, logits_TA: torch.Tensor, ctx: ForwardContext):
    """(token_idx_N, expert_N, gate_N, slot_N) of the layer from its fp32 logits [T, A] (global
    expert ids); adds the routing losses, the expert loads and the statistics as the per-group
    path does."""
    cfg, k = layer.cfg, layer.cfg.k
    plan = _plan(layer, ctx, logits_TA)
    rows = plan.rows_V
    logits_VA = logits_TA if rows is None else logits_TA.index_select(0, rows)
    masked_VA = logits_VA + plan.mask_VA
    scores_VA = router.scores_from_logits(masked_VA, cfg.score)
    select_VA = scores_VA + plan.mask_VA  # an underflowed score never ties an outside expert
    if cfg.bias_update_rate > 0:
        select_VA = select_VA + layer.expert_bias
    _, expert_VK = torch.topk(select_VA, k, dim=1)
    gate_VK = scores_VA.gather(1, expert_VK)
    if cfg.renormalize:
        gate_VK = router.renormalized(gate_VK, cfg.top1_straight_through)
    expert_N, gate_N = expert_VK.reshape(-1), gate_VK.reshape(-1)
    counts_A = None
    if layer.training and (cfg.load_balance_coef or cfg.bias_update_rate > 0):
        counts_A = logits_TA.new_zeros(layer.num_experts)
        counts_A = counts_A.index_add(0, expert_N, torch.ones_like(gate_N))
    if layer.training:
        _add_losses(cfg, plan, masked_VA, scores_VA, counts_A, ctx)
        if cfg.bias_update_rate > 0:
            layer.load_accum += counts_A
    _add_stats(layer, logits_VA, expert_VK, gate_N, plan, ctx)
    return plan.token_idx_N, expert_N, gate_N, plan.slot_N


def _add_losses(cfg, plan: Plan, masked_VA, scores_VA, counts_A, ctx: ForwardContext) -> None:
    """The enabled routing losses, each the sum over groups of the per-group one (an empty
    group adds zero, as it does there)."""
    probs_VA = scores_VA
    if cfg.score != "softmax":  # sigmoid scores normalised over the group (losses.routing_probs)
        probs_VA = scores_VA / scores_VA.sum(-1, keepdim=True).clamp_min(1e-20)
    terms = {
        "moe/load_balance": (
            cfg.load_balance_coef,
            lambda: (plan.balance_A * counts_A * probs_VA.sum(0)).sum(),
        ),
        "moe/router_z": (
            cfg.router_z_coef,
            lambda: (torch.logsumexp(masked_VA, -1).pow(2) * plan.inv_count_V).sum(),
        ),
        "moe/entropy_local": (
            cfg.entropy_local_coef,
            lambda: (losses.entropy(probs_VA) * plan.inv_count_V).sum(),
        ),
        # Each group's mean distribution sums to 1: their entropies' sum is one over [A].
        "moe/entropy_global": (
            -cfg.entropy_global_coef,
            lambda: losses.entropy(probs_VA.sum(0) * plan.inv_count_A),
        ),
    }
    for name, (coef, term) in terms.items():
        if coef != 0:
            ctx.add_loss(name, coef * term())


def _plan(layer, ctx: ForwardContext, like: torch.Tensor) -> Plan:
    k = layer.cfg.k
    key = ("token_choice_plan", tuple((g.modalities, g.num_experts) for g in layer.group_specs), k)
    plan = ctx.cache.get(key)
    if plan is not None:
        return plan
    T, A, device = like.shape[0], layer.num_experts, like.device
    parts, spans, first = [], [], 0
    for group in layer.group_specs:
        positions, count = ctx.tokens.group(group.modalities)
        parts.append(positions)
        spans.append((first, count))
        first += count
    V = first
    whole = len(parts) == 1 and V == T
    rows_V = None if whole else cat_parts(parts)
    mask_VA = torch.full((V, A), float("-inf"), device=device)
    inv_count_V = torch.zeros(V, device=device)
    balance_A = torch.zeros(A, device=device)
    inv_count_A = torch.zeros(A, device=device)
    for group, gr, (start, count) in zip(layer.group_specs, layer.group_routers, spans):
        if not count:
            continue
        E, cols = group.num_experts, slice(gr.offset, gr.offset + group.num_experts)
        mask_VA[start : start + count, cols].fill_(0.0)
        inv_count_V[start : start + count].fill_(1.0 / count)
        balance_A[cols].fill_(E / (k * count * count))
        inv_count_A[cols].fill_(1.0 / count)
    positions_V = torch.arange(T, device=device) if rows_V is None else rows_V
    token_idx_N = positions_V.repeat_interleave(k)
    slot_N = (positions_V.unsqueeze(1) * k + torch.arange(k, device=device)).reshape(-1)
    plan = Plan(rows_V, mask_VA, token_idx_N, slot_N, inv_count_V, balance_A, inv_count_A, spans)
    ctx.cache[key] = plan
    return plan


def _add_stats(layer, logits_VA, expert_VK, gate_N, plan: Plan, ctx: ForwardContext) -> None:
    """Each group's statistics, as the per-group path reports them: the host-side pair and
    token counts on every step, the rest (rebuilt per group) on the steps that log them."""
    k = layer.cfg.k
    for group, gr, (start, count) in zip(layer.group_specs, layer.group_routers, plan.spans):
        gr.add_counts(count, count * k, ctx)
        if not ctx.collect_stats:
            continue
        E, off = group.num_experts, gr.offset
        expert_TK = expert_VK[start : start + count] - off
        chosen_TE = torch.zeros(count, E, dtype=torch.bool, device=logits_VA.device)
        chosen_TE.scatter_(1, expert_TK, True)
        routing = router.Routing(
            torch.arange(count, device=logits_VA.device).repeat_interleave(k),
            expert_TK.reshape(-1),
            gate_N[start * k : (start + count) * k].detach(),
            chosen_TE,
            logits_VA.new_zeros(()),
        )
        gr.add_stats(layer, logits_VA[start : start + count, off : off + E].detach(), routing, ctx)
