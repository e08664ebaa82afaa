"""The modality-aware MoE feed-forward layer.

tokens [T, d] with modality ids -> per group: router (fp32) -> selection -> one sort by expert
over all groups -> (dispatcher: local experts, or all-to-all under expert parallelism) ->
un-permute, weight by gates, index_add -> plus shared experts.

Shape legend: B batch, S sequence, T tokens, d width, E experts of a group, N selected pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.errors import UserError
from mm_moe.model.context import ForwardContext
from mm_moe.model.mlp import SwiGLU
from mm_moe.model.moe import losses, router
from mm_moe.model.moe.aux_router import AuxRouter
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.dispatch import permute, sort_by_expert, unpermute
from mm_moe.model.moe.experts import GroupedExperts


class LocalDispatcher:
    """Runs the sorted rows through this process's experts (no expert parallelism).

    A dispatcher chooses the order of the rows it receives: rows are sorted by
    `slot_of_expert[global expert id]` and `counts_E` counts rows per slot. None is the
    identity (global id order); an expert-parallel dispatcher (mm_moe/parallel) orders them by
    owner rank, then local expert.
    """

    slot_of_expert: torch.Tensor | None = None

    def __call__(self, x_Nd: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts):
        return experts(x_Nd, counts_E)


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, dense_hidden: int, layer_index: int):
        super().__init__()
        if dense_hidden % cfg.granularity:
            raise UserError(
                f"moe.granularity={cfg.granularity} must divide the FFN hidden size {dense_hidden}"
            )
        self.cfg, self.layer_index = cfg, layer_index
        self.group_specs = cfg.groups()
        hidden = dense_hidden // cfg.granularity
        self.offsets = {}
        total = 0
        for name, _, n in self.group_specs:
            self.offsets[name] = total
            total += n
        self.num_experts = total
        self.routers = nn.ModuleDict(
            {name: nn.Linear(d_model, n, bias=False) for name, _, n in self.group_specs}
        )
        self.experts = GroupedExperts(total, d_model, hidden, cfg.gemm)
        self.shared = nn.ModuleDict()
        if cfg.shared_experts:
            for name, _, _ in self.group_specs:
                self.shared[name] = SwiGLU(d_model, hidden * cfg.shared_experts)
        self.aux_routers = nn.ModuleDict()
        if cfg.router == "expert_choice":
            for name, _, n in self.group_specs:
                self.aux_routers[name] = AuxRouter(d_model, cfg.aux_router_hidden, n)
        # Aux-loss-free balancing: selection bias, moved from outside after optimizer steps
        # from the loads summed over data-parallel ranks (see moe/balance.py).
        self.register_buffer("expert_bias", torch.zeros(total))
        self.register_buffer("load_accum", torch.zeros(total), persistent=False)
        self.dispatcher = LocalDispatcher()

    def _route(self, name: str, x_Td: torch.Tensor, ctx: ForwardContext) -> router.Routing:
        cfg = self.cfg
        E = self.routers[name].out_features
        # fp32 logits from fp32 copies of input and weight (not a bf16 product cast after):
        # expert choice takes a top-C over these scores, and bf16 would tie them.
        logits_TE = F.linear(x_Td.float(), self.routers[name].weight.float())
        scores_TE = router.scores_from_logits(logits_TE, cfg.score)
        select_TE = scores_TE
        if self.training and cfg.router_noise > 0:
            noisy = logits_TE + cfg.router_noise * router.logistic_noise_like(logits_TE)
            select_TE = router.scores_from_logits(noisy, cfg.score)
        off = self.offsets[name]
        if cfg.bias_update_rate > 0:
            select_TE = select_TE + self.expert_bias[off : off + E]
        T = x_Td.shape[0]
        prefix = f"moe/l{self.layer_index}/{name}"
        if cfg.router == "expert_choice":
            aux_logits_TE = self.aux_routers[name](x_Td)
            if self.training:
                capacity = router.expert_capacity(T, E, cfg.capacity_factor, cfg.k)
                routing = router.expert_choice(scores_TE, select_TE, capacity)
            else:
                routing = router.from_mask(scores_TE, aux_logits_TE > 0)
            aux_loss, aux_acc, baseline = AuxRouter.loss_and_accuracy(
                aux_logits_TE, routing.chosen_TE
            )
            if self.training and cfg.aux_router_coef > 0:
                ctx.add_loss("moe/aux_router_bce", cfg.aux_router_coef * aux_loss)
            ctx.add_stat(f"{prefix}/aux_router_acc", aux_acc)
            ctx.add_stat(f"{prefix}/aux_router_baseline", baseline)
        else:
            capacity = None
            if self.training and cfg.capacity_factor > 0:
                capacity = router.token_capacity(T, E, cfg.capacity_factor, cfg.k)
            routing = router.token_choice(scores_TE, select_TE, cfg.k, cfg.renormalize, capacity)
        self._add_losses(prefix, logits_TE, routing, ctx)
        if self.training and cfg.bias_update_rate > 0:
            self.load_accum[off : off + E] += routing.chosen_TE.sum(0).float()
        return routing

    def _add_losses(self, prefix, logits_TE, routing: router.Routing, ctx: ForwardContext):
        cfg = self.cfg
        probs_TE = losses.routing_probs(logits_TE, cfg.score)
        if self.training:
            # An empty group still reports each enabled loss (as zero), so every rank logs
            # the same keys.
            empty, zero = logits_TE.shape[0] == 0, logits_TE.sum()
            if cfg.load_balance_coef > 0:
                lb = zero if empty else losses.load_balance_loss(probs_TE, routing.chosen_TE)
                ctx.add_loss("moe/load_balance", cfg.load_balance_coef * lb)
            if cfg.router_z_coef > 0:
                z = zero if empty else losses.router_z_loss(logits_TE)
                ctx.add_loss("moe/router_z", cfg.router_z_coef * z)
            if cfg.entropy_local_coef > 0:
                local = zero if empty else losses.local_entropy(probs_TE)
                ctx.add_loss("moe/entropy_local", cfg.entropy_local_coef * local)
            if cfg.entropy_global_coef > 0:
                glob = zero if empty else losses.global_entropy(probs_TE)
                ctx.add_loss("moe/entropy_global", -cfg.entropy_global_coef * glob)
        if logits_TE.shape[0] == 0:
            load_E = logits_TE.new_zeros(logits_TE.shape[1])
            router_entropy = logits_TE.new_zeros(())
        else:
            load_E = routing.chosen_TE.float().sum(0) / routing.chosen_TE.sum().clamp_min(1)
            router_entropy = losses.local_entropy(probs_TE)
        # Vector stats are expanded to one metric per expert when logged.
        ctx.add_stat(f"{prefix}/load", load_E)
        # Routed (token, expert) pairs and the group's tokens: their ratio is the experts per
        # token actually computed (expert-choice capacity rounds), which FLOPs accounting uses.
        ctx.add_stat(f"{prefix}/pairs", float(routing.token_idx_N.numel()))
        ctx.add_stat(f"{prefix}/tokens", float(logits_TE.shape[0]))
        ctx.add_stat(f"{prefix}/dropped", routing.dropped_fraction)
        ctx.add_stat(f"{prefix}/router_entropy", router_entropy)

    def forward(self, x_BSd: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, d = x_BSd.shape
        x_Td = x_BSd.reshape(B * S, d)
        modality_T = ctx.modality_ids_BS.reshape(-1)
        valid_T = ctx.valid_BS.reshape(-1)
        token_idx, expert_idx, gates = [], [], []
        # Dropless token choice gives every routed token exactly k pairs, in token-major order.
        fanout = (
            self.cfg.k
            if self.cfg.router == "token_choice"
            and not (self.training and self.cfg.capacity_factor > 0)
            else 0
        )
        shared_out_Td = None
        for name, modalities, _ in self.group_specs:
            in_group_T = valid_T & torch.isin(modality_T, modality_T.new_tensor(modalities))
            group_tokens = in_group_T.nonzero(as_tuple=True)[0]
            # A group holding every token (one mixed group, a single-modality batch) needs
            # no gather, and its backward no scatter.
            whole = len(group_tokens) == len(x_Td)
            x_group = x_Td if whole else x_Td.index_select(0, group_tokens)
            routing = self._route(name, x_group, ctx)
            token_idx.append(routing.token_idx_N if whole else group_tokens[routing.token_idx_N])
            expert_idx.append(routing.expert_idx_N + self.offsets[name])
            gates.append(routing.gate_N)
            if name in self.shared:
                shared_Td = self.shared[name](x_group)
                if whole and shared_out_Td is None:
                    shared_out_Td = shared_Td
                elif whole:
                    shared_out_Td = shared_out_Td + shared_Td
                else:
                    if shared_out_Td is None:
                        shared_out_Td = torch.zeros_like(x_Td)
                    shared_out_Td = shared_out_Td.index_add(0, group_tokens, shared_Td)
        expert_idx_N = torch.cat(expert_idx)
        slot_of_expert = getattr(self.dispatcher, "slot_of_expert", None)
        if slot_of_expert is not None:
            expert_idx_N = slot_of_expert[expert_idx_N]
        token_idx_N = torch.cat(token_idx)
        slot_N = None
        if fanout:
            pair_N = torch.arange(len(token_idx_N), device=token_idx_N.device)
            slot_N = token_idx_N * fanout + pair_N % fanout
        perm = sort_by_expert(
            token_idx_N, expert_idx_N, torch.cat(gates), self.num_experts, slot_N, B * S, fanout
        )
        y_Nd = self.dispatcher(permute(x_Td, perm), perm.counts_E, self.experts)
        out_Td = unpermute(y_Nd, perm, B * S)
        if shared_out_Td is not None:
            out_Td = out_Td + shared_out_Td
        return out_Td.view(B, S, d)
