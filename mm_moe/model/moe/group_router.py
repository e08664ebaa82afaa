"""Routing of one expert group: scores (fp32), selection (expert choice, or token choice with
or without capacity), the auxiliary routers of expert choice, the routing losses and the
routing statistics.

The parameters stay where checkpoints name them, in the MoE layer (`routers.<group>`,
`aux_routers.<group>`, `expert_bias`); a GroupRouter is the logic over one group's share.

Shape legend: T tokens of the group, d width, E experts of the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_moe.model.context import ForwardContext
from mm_moe.model.moe import health, losses, router
from mm_moe.model.moe.aux_router import AuxRouter
from mm_moe.model.moe.config import ExpertGroup, MoEConfig


class GroupRouter:
    def __init__(self, cfg: MoEConfig, group: ExpertGroup, offset: int, layer_index: int):
        self.cfg, self.group, self.offset = cfg, group, offset
        self.prefix = f"moe/l{layer_index}/{group.name}"

    def _scores(self, layer, x_Td: torch.Tensor):
        """(logits, gate scores, selection scores), fp32."""
        cfg, E = self.cfg, self.group.num_experts
        # fp32 logits from fp32 copies of input and weight (not a bf16 product cast after):
        # expert choice takes a top-C over these scores, and bf16 would tie them.
        x_Td, w_Ed = x_Td.float(), layer.routers[self.group.name].weight.float()
        if cfg.router_logits == "cosine":
            logits_TE = cfg.cosine_router_scale * F.linear(
                F.normalize(x_Td, dim=-1), F.normalize(w_Ed, dim=-1)
            )
        else:
            logits_TE = F.linear(x_Td, w_Ed)
        scores_TE = router.scores_from_logits(logits_TE, cfg.score)
        select_TE = scores_TE
        noise = cfg.router_noise * layer.noise_scale
        if layer.training and noise > 0:
            noisy = logits_TE + noise * router.logistic_noise_like(logits_TE)
            select_TE = router.scores_from_logits(noisy, cfg.score)
        if cfg.bias_update_rate > 0:
            select_TE = select_TE + layer.expert_bias[self.offset : self.offset + E]
        return logits_TE, scores_TE, select_TE

    def route(self, layer, x_Td: torch.Tensor, ctx: ForwardContext) -> router.Routing:
        """The group's (token, expert) pairs and gates for its tokens `x_Td`; adds the
        routing losses and statistics to `ctx`."""
        cfg, T, E = self.cfg, x_Td.shape[0], self.group.num_experts
        logits_TE, scores_TE, select_TE = self._scores(layer, x_Td)
        if cfg.router == "expert_choice":
            routing = self._expert_choice(layer, x_Td, scores_TE, select_TE, ctx)
        else:
            capacity = None
            if layer.training and cfg.capacity_factor > 0:
                capacity = router.token_capacity(T, E, cfg.capacity_factor, cfg.k)
            routing = router.token_choice(scores_TE, select_TE, cfg.k, cfg.renormalize, capacity)
        if layer.training:
            self._add_losses(logits_TE, routing, ctx)
        self._add_stats(layer, logits_TE, routing, ctx)
        if layer.training and cfg.bias_update_rate > 0:
            layer.load_accum[self.offset : self.offset + E] += routing.chosen_TE.sum(0).float()
        return routing

    def _expert_choice(self, layer, x_Td, scores_TE, select_TE, ctx) -> router.Routing:
        """Top-C per expert in training; the auxiliary routers' causal prediction in eval."""
        cfg, T, E = self.cfg, x_Td.shape[0], self.group.num_experts
        aux_logits_TE = layer.aux_routers[self.group.name](x_Td)
        if layer.training:
            capacity = router.expert_capacity(T, E, cfg.capacity_factor, cfg.k)
            normalize = cfg.expert_choice_gate == "normalized"
            routing = router.expert_choice(scores_TE, select_TE, capacity, normalize)
        else:
            routing = router.from_mask(scores_TE, aux_logits_TE > 0)
        aux_loss, aux_acc, baseline = AuxRouter.loss_and_accuracy(aux_logits_TE, routing.chosen_TE)
        if layer.training and cfg.aux_router_coef > 0:
            ctx.add_aux_router_loss("moe/aux_router_bce", cfg.aux_router_coef * aux_loss)
        ctx.add_stat(f"{self.prefix}/aux_router_acc", aux_acc)
        ctx.add_stat(f"{self.prefix}/aux_router_baseline", baseline)
        return routing

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

    def _add_stats(self, layer, logits_TE, routing: router.Routing, ctx: ForwardContext) -> None:
        if logits_TE.shape[0] == 0:
            load_E = logits_TE.new_zeros(logits_TE.shape[1])
            entropy = logits_TE.new_zeros(())
        else:
            load_E = routing.chosen_TE.float().sum(0) / routing.chosen_TE.sum().clamp_min(1)
            entropy = losses.local_entropy(losses.routing_probs(logits_TE, self.cfg.score))
        # Vector stats are expanded to one metric per expert when logged.
        ctx.add_stat(f"{self.prefix}/load", load_E)
        ctx.add_stat(f"{self.prefix}/dropped", routing.dropped_fraction)
        ctx.add_stat(f"{self.prefix}/router_entropy", entropy)
        # Routed (token, expert) pairs and the group's tokens: their ratio is the experts per
        # token actually computed (expert-choice capacity rounds), which FLOPs accounting uses.
        ctx.add_stat(f"{self.prefix}/pairs", float(routing.token_idx_N.numel()))
        ctx.add_stat(f"{self.prefix}/tokens", float(logits_TE.shape[0]))
        if layer.collect_health:
            weight_Ed = layer.routers[self.group.name].weight
            for name, value in health.routing_health(logits_TE, routing, weight_Ed).items():
                ctx.add_stat(f"{self.prefix}/{name}", value)
