"""Routing of one expert group: scores (fp32), selection (expert choice, or token choice with
or without capacity), the auxiliary routers of expert choice, the routing losses and the
routing statistics.

The parameters stay where checkpoints name them, in the MoE layer (`routers.<group>`,
`aux_routers.<group>`, `expert_bias`); a GroupRouter is the logic over one group's share.

Shape legend: T tokens of the group, d width, E experts of the group.
"""

from __future__ import annotations

import torch

from mm_moe.model.context import ForwardContext
from mm_moe.model.moe import health, losses, router
from mm_moe.model.moe.aux_router import AuxRouter
from mm_moe.model.moe.config import ExpertGroup, MoEConfig


class GroupRouter:
    def __init__(self, cfg: MoEConfig, group: ExpertGroup, offset: int, layer_index: int):
        self.cfg, self.group, self.offset = cfg, group, offset
        self.prefix = f"moe/l{layer_index}/{group.name}"

    def scores(self, layer, logits_TE: torch.Tensor):
        """(gate scores, selection scores), fp32, from the group's fp32 logits."""
        cfg, E = self.cfg, self.group.num_experts
        scores_TE = router.scores_from_logits(logits_TE, cfg.score)
        select_TE = scores_TE
        noise = cfg.router_noise * layer.noise_scale
        if layer.training and noise > 0:
            noisy = logits_TE + noise * router.logistic_noise_like(logits_TE)
            select_TE = router.scores_from_logits(noisy, cfg.score)
        if cfg.bias_update_rate > 0:
            select_TE = select_TE + layer.expert_bias[self.offset : self.offset + E]
        return scores_TE, select_TE

    def route(self, layer, logits_TE, aux_logits_TE, ctx: ForwardContext) -> router.Routing:
        """The group's (token, expert) pairs and gates from its tokens' fp32 router logits
        (and auxiliary-router logits, expert choice); adds the routing losses and (when
        `ctx.collect_stats`) the statistics to `ctx`."""
        cfg, T, E = self.cfg, logits_TE.shape[0], self.group.num_experts
        scores_TE, select_TE = self.scores(layer, logits_TE)
        if cfg.router == "expert_choice":
            routing = self._expert_choice(layer, aux_logits_TE, scores_TE, select_TE, ctx)
        else:
            capacity = None
            if layer.training and cfg.capacity_factor > 0:
                capacity = router.token_capacity(T, E, cfg.capacity_factor, cfg.k)
            routing = router.token_choice(
                scores_TE, select_TE, cfg.k, cfg.renormalize, capacity, cfg.top1_straight_through
            )
        if layer.training:
            self._add_losses(logits_TE, routing, ctx)
        self.add_counts(logits_TE.shape[0], routing.token_idx_N.numel(), ctx)
        if ctx.collect_stats:
            self.add_stats(layer, logits_TE, routing, ctx)
        if layer.training and cfg.bias_update_rate > 0:
            layer.load_accum[self.offset : self.offset + E] += routing.chosen_TE.sum(0).float()
        return routing

    def capacity(self, num_tokens: int) -> int:
        """Expert choice in training: the tokens each of the group's experts takes from a
        batch with `num_tokens` of the group's tokens."""
        E, cfg = self.group.num_experts, self.cfg
        return router.expert_capacity(num_tokens, E, cfg.capacity_factor, cfg.k)

    def _expert_choice(self, layer, aux_logits_TE, scores_TE, select_TE, ctx) -> router.Routing:
        """Top-C per expert in training; the auxiliary routers' causal prediction in eval."""
        cfg, T = self.cfg, scores_TE.shape[0]
        if layer.training:
            capacity = self.capacity(T)
            normalize = cfg.expert_choice_gate == "normalized"
            routing = router.expert_choice(scores_TE, select_TE, capacity, normalize)
        else:
            routing = router.from_mask(scores_TE, aux_logits_TE > 0)
        if layer.training and cfg.aux_router_coef > 0:
            aux_loss = AuxRouter.loss(aux_logits_TE, routing.chosen_TE)
            ctx.add_aux_router_loss("moe/aux_router_bce", cfg.aux_router_coef * aux_loss)
        if ctx.collect_stats:
            self.add_aux_accuracy(aux_logits_TE, routing.chosen_TE, ctx)
        return routing

    def add_aux_accuracy(self, aux_logits_TE, chosen_TE, ctx: ForwardContext) -> None:
        aux_acc, baseline = AuxRouter.accuracy(aux_logits_TE, chosen_TE)
        ctx.add_stat(f"{self.prefix}/aux_router_acc", aux_acc)
        ctx.add_stat(f"{self.prefix}/aux_router_baseline", baseline)

    def _add_losses(self, logits_TE, routing: router.Routing, ctx: ForwardContext) -> None:
        """The enabled routing losses. An empty group still reports each (as zero), so every
        rank logs the same keys."""
        cfg = self.cfg
        probs_TE = losses.routing_probs(logits_TE, cfg.score)
        empty, zero = logits_TE.shape[0] == 0, logits_TE.sum()
        terms = {
            "moe/load_balance": (
                cfg.load_balance_coef,
                lambda: losses.load_balance_loss(probs_TE, routing.chosen_TE),
            ),
            "moe/router_z": (cfg.router_z_coef, lambda: losses.router_z_loss(logits_TE)),
            "moe/entropy_local": (cfg.entropy_local_coef, lambda: losses.local_entropy(probs_TE)),
            # maximised: subtracted
            "moe/entropy_global": (
                -cfg.entropy_global_coef,
                lambda: losses.global_entropy(probs_TE),
            ),
        }
        for name, (coef, term) in terms.items():
            if coef != 0:
                ctx.add_loss(name, coef * (zero if empty else term()))

    def add_counts(self, num_tokens: int, num_pairs: int, ctx: ForwardContext) -> None:
        """Routed (token, expert) pairs and the group's tokens, on every step (the host knows
        them): their ratio is the experts per token actually computed (expert-choice capacity
        rounds), which FLOPs accounting uses on every step."""
        ctx.add_stat(f"{self.prefix}/pairs", float(num_pairs))
        ctx.add_stat(f"{self.prefix}/tokens", float(num_tokens))

    def add_stats(self, layer, logits_TE, routing: router.Routing, ctx: ForwardContext) -> None:
        """The statistics of the steps that log them."""
        if logits_TE.shape[0] == 0:
            load_E = logits_TE.new_zeros(logits_TE.shape[1])
            entropy = logits_TE.new_zeros(())
        else:
            load_E = routing.chosen_TE.float().sum(0) / routing.chosen_TE.sum().clamp_min(1)
            entropy = losses.local_entropy(losses.routing_probs(logits_TE, self.cfg.score))
        dropped = routing.dropped_fraction
        if dropped is None:
            dropped = router.unprocessed_fraction(routing.chosen_TE)
        # Vector stats are expanded to one metric per expert when logged.
        ctx.add_stat(f"{self.prefix}/load", load_E)
        ctx.add_stat(f"{self.prefix}/dropped", dropped)
        ctx.add_stat(f"{self.prefix}/router_entropy", entropy)
        if layer.collect_health:
            weight_Ed = layer.routers[self.group.name].weight
            for name, value in health.routing_health(logits_TE, routing, weight_Ed).items():
                ctx.add_stat(f"{self.prefix}/{name}", value)
