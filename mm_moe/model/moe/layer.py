"""The modality-aware MoE feed-forward layer.

tokens [T, d] with modality ids -> every group's router (one fp32 matmul) -> selection (all
groups at once where moe/batched_choice.py or moe/batched_tokens.py applies, else per group)
-> one sort by expert over all groups -> (dispatcher: local experts, or all-to-all under expert
parallelism) -> un-permute, weight by gates, index_add -> plus shared experts.

Shape legend: B batch, S sequence, T tokens, d width, E experts of a group, N selected pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.errors import UserError
from mm_moe.model.context import ForwardContext
from mm_moe.model.mlp import SwiGLU
from mm_moe.model.moe import batched_choice, batched_tokens
from mm_moe.model.moe.aux_router import AuxRouter, batched_logits
from mm_moe.model.moe.batched_choice import cat_parts
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.dispatch import permute, sort_by_expert, unpermute
from mm_moe.model.moe.experts import GroupedExperts
from mm_moe.model.moe.group_router import GroupRouter


class LocalDispatcher:
    """Runs the sorted rows through this process's experts (no expert parallelism).

    A dispatcher chooses the order of the rows it receives: rows are sorted by
    `slot_of_expert[global expert id]` and `counts_E` counts rows per slot. None is the
    identity (global id order); an expert-parallel dispatcher (mm_moe/parallel) orders them by
    owner rank, then local expert.
    """

    slot_of_expert: torch.Tensor | None = None
    rank = 0  # this process's index among the peers whose rows it exchanges (none here)

    def __call__(self, x_Nd: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts):
        return experts(x_Nd, counts_E)

    def runs(self, x_Nd: torch.Tensor, runs_R: list[list[tuple[int, int]]], experts):
        """Rows already in global expert order, in runs of (experts, rows each) that the host
        knows (expert choice): no counts tensor needed. runs_R: each peer's runs (here the
        one process's: `TokenIndex.peer_sizes` without peers)."""
        (runs,) = runs_R
        return experts.forward_runs(x_Nd, runs)


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
        # Global expert ids: the groups' experts one after another, in group order.
        self.offsets, total = {}, 0
        for group in self.group_specs:
            self.offsets[group.name] = total
            total += group.num_experts
        self.num_experts = total
        self.group_routers = [
            GroupRouter(cfg, g, self.offsets[g.name], layer_index) for g in self.group_specs
        ]
        names = [g.name for g in self.group_specs]
        self.routers = nn.ModuleDict(
            {g.name: nn.Linear(d_model, g.num_experts, bias=False) for g in self.group_specs}
        )
        self.experts = GroupedExperts(total, d_model, hidden, cfg.gemm)
        self.shared = nn.ModuleDict()
        if cfg.shared_experts:
            self.shared.update({n: SwiGLU(d_model, hidden * cfg.shared_experts) for n in names})
        self.aux_routers = nn.ModuleDict()
        if cfg.router == "expert_choice":
            self.aux_routers.update(
                {
                    g.name: AuxRouter(d_model, cfg.aux_router_hidden, g.num_experts)
                    for g in self.group_specs
                }
            )
        # Aux-loss-free balancing: selection bias, moved from outside after optimizer steps
        # from the loads summed over data-parallel ranks (see moe/balance.py).
        self.register_buffer("expert_bias", torch.zeros(total))
        self.register_buffer("load_accum", torch.zeros(total), persistent=False)
        self.dispatcher = LocalDispatcher()
        # Multiplies moe.router_noise; a trainer hook anneals it (moe.router_noise_anneal_steps).
        self.noise_scale = 1.0
        # Routing-health statistics in this forward (moe.health_stats); training sets it for
        # the steps it logs only.
        self.collect_health = cfg.health_stats
        # Expert choice in training and dropless token choice route every group at once
        # where they can (moe/batched_choice.py, moe/batched_tokens.py); false: group by
        # group (tests hold the two equal).
        self.batched_routing = True

    @torch.no_grad()
    def init_routers(self, std: float) -> None:
        """moe.router_init=orthogonal: each group's router rows orthogonal, each with the
        norm of a N(0, std^2) row (std * sqrt(d)); normal rows are the model's default."""
        if self.cfg.router_init != "orthogonal":
            return
        for linear in self.routers.values():
            torch.nn.init.orthogonal_(linear.weight)
            linear.weight.mul_(std * linear.weight.shape[1] ** 0.5)

    def fanout(self) -> int:
        """Dropless token choice gives every routed token exactly k pairs, in token-major
        order (the combine is then a fused gather-sum); 0 otherwise."""
        cfg = self.cfg
        dropless = not (self.training and cfg.capacity_factor > 0)
        return cfg.k if cfg.router == "token_choice" and dropless else 0

    def _router_logits(self, x_Td: torch.Tensor) -> torch.Tensor:
        """[T, all experts] fp32 logits of every group's router, as one matmul over every
        token (each group then reads its tokens' rows of its own columns). fp32 copies of
        input and weights, not a bf16 product cast after: expert choice takes a top-C over
        these scores, and bf16 would tie them."""
        weights = [self.routers[g.name].weight for g in self.group_specs]
        w_Ed = (weights[0] if len(weights) == 1 else torch.cat(weights)).float()
        x_Td = x_Td.float()
        if self.cfg.router_logits == "cosine":
            return self.cfg.cosine_router_scale * F.linear(
                F.normalize(x_Td, dim=-1), F.normalize(w_Ed, dim=-1)
            )
        return F.linear(x_Td, w_Ed)

    def forward(self, x_BSd: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, d = x_BSd.shape
        T = B * S
        x_Td = x_BSd.reshape(T, d)
        prepare = getattr(self.dispatcher, "prepare", None)
        if prepare is not None:  # before the groups' sizes are first read (one host sync)
            prepare(ctx.tokens)
        logits_TE = self._router_logits(x_Td)
        aux_TE = None
        if self.aux_routers:  # expert choice: every group's auxiliary router in one op
            aux_TE = batched_logits([self.aux_routers[g.name] for g in self.group_specs], x_Td)
        shared_out_Td = self._shared(x_Td, ctx)
        if self.batched_routing and batched_choice.applies(self):
            choice = batched_choice.route(self, logits_TE, aux_TE, ctx)
            out_Td = self._experts_static(
                x_Td, choice.token_idx_N, choice.gate_N, choice.capacities, ctx
            )
            return self._finish(out_Td, shared_out_Td, B, S)
        if self.batched_routing and batched_tokens.applies(self):
            out_Td = self._experts(x_Td, *batched_tokens.route(self, logits_TE, ctx))
            return self._finish(out_Td, shared_out_Td, B, S)
        routings = []
        for group, group_router in zip(self.group_specs, self.group_routers):
            # Positions from the forward's TokenIndex (its one host sync, shared by layers).
            group_tokens, count = ctx.tokens.group(group.modalities)
            # A group holding every token (one mixed group, a single-modality batch) needs
            # no gather, and its backward no scatter.
            whole = count == T
            cols = slice(group_router.offset, group_router.offset + group.num_experts)
            rows = slice(None) if whole else group_tokens
            aux = aux_TE[rows, cols] if aux_TE is not None else None
            routing = group_router.route(self, logits_TE[rows, cols], aux, ctx)
            if not whole:
                routing.token_idx_N = group_tokens[routing.token_idx_N]
            routings.append(routing)
        if all(r.capacity is not None for r in routings) and hasattr(self.dispatcher, "runs"):
            out_Td = self._experts_static(
                x_Td,
                cat_parts([r.token_idx_N for r in routings]),
                cat_parts([r.gate_N for r in routings]),
                [r.capacity for r in routings],
                ctx,
            )
        else:
            out_Td = self._experts(
                x_Td,
                torch.cat([r.token_idx_N for r in routings]),
                torch.cat(
                    [r.expert_idx_N + g.offset for r, g in zip(routings, self.group_routers)]
                ),
                torch.cat([r.gate_N for r in routings]),
            )
        return self._finish(out_Td, shared_out_Td, B, S)

    def _shared(self, x_Td: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The shared experts' output (each group's on its own tokens); None without any."""
        shared_out_Td, T = None, len(x_Td)
        for group in self.group_specs:
            if group.name not in self.shared:
                continue
            group_tokens, count = ctx.tokens.group(group.modalities)
            whole = count == T  # no gather, and no scatter in the backward
            x_group = x_Td if whole else x_Td.index_select(0, group_tokens)
            shared_Td = self.shared[group.name](x_group)
            shared_out_Td = _add_rows(
                shared_out_Td, shared_Td, None if whole else group_tokens, x_Td
            )
        return shared_out_Td

    @staticmethod
    def _finish(out_Td, shared_out_Td, B: int, S: int) -> torch.Tensor:
        if shared_out_Td is not None:
            out_Td = out_Td + shared_out_Td
        return out_Td.view(B, S, -1)

    def _experts_static(
        self, x_Td, token_idx_N, gate_N, capacities: list[int], ctx: ForwardContext
    ) -> torch.Tensor:
        """Expert choice in training: every expert of a group takes C tokens, so the pairs
        arrive sorted by expert with counts the host knows: one gather, batched expert GEMMs
        over [E, C, d], one scatter-add to combine (no sort, no counts, no host sync). Under
        expert parallelism every peer's capacities follow from its group sizes, which the
        forward's TokenIndex gathered: the all-to-all splits need no count exchange."""
        runs = [(g.num_experts, C) for g, C in zip(self.group_specs, capacities)]
        sizes_GR = [ctx.tokens.peer_sizes(g.modalities) for g in self.group_specs]
        runs_R = [
            [
                (g.num_experts, gr.capacity(n_R[r]))
                for g, gr, n_R in zip(self.group_specs, self.group_routers, sizes_GR)
            ]
            for r in range(len(sizes_GR[0]))
        ]
        # The dispatcher splits these rows by this process's entry: they must be its own.
        assert runs == runs_R[self.dispatcher.rank], (runs, runs_R, self.dispatcher.rank)
        x_Nd = x_Td.index_select(0, token_idx_N)
        y_Nd = self.dispatcher.runs(x_Nd, runs_R, self.experts)
        weighted_Nd = y_Nd * gate_N.unsqueeze(1).to(y_Nd.dtype)
        return y_Nd.new_zeros(x_Td.shape).index_add(0, token_idx_N, weighted_Nd)

    def _experts(self, x_Td, token_idx_N, expert_idx_N, gate_N, slot_N=None) -> torch.Tensor:
        """Sort the pairs by dispatch slot, run them through the experts (locally or by
        all-to-all), weight by gates and sum per token. slot_N: with a fanout, each pair's
        token * K + j where the caller has it already (batched token choice)."""
        T, fanout = len(x_Td), self.fanout()
        slot_of_expert = getattr(self.dispatcher, "slot_of_expert", None)
        if slot_of_expert is not None:
            expert_idx_N = slot_of_expert[expert_idx_N]
        if not fanout:
            slot_N = None
        elif slot_N is None:
            pair_N = torch.arange(len(token_idx_N), device=token_idx_N.device)
            slot_N = token_idx_N * fanout + pair_N % fanout
        perm = sort_by_expert(
            token_idx_N, expert_idx_N, gate_N, self.num_experts, slot_N, T, fanout
        )
        y_Nd = self.dispatcher(permute(x_Td, perm), perm.counts_E, self.experts)
        return unpermute(y_Nd, perm, T)


def _add_rows(total_Td, rows, index, like_Td) -> torch.Tensor:
    """total + rows, where rows cover every token (index None) or the tokens `index`; a
    missing total is zero (shaped like `like_Td`)."""
    if index is None:
        return rows if total_Td is None else total_Td + rows
    if total_Td is None:
        total_Td = torch.zeros_like(like_Td)
    return total_Td.index_add(0, index, rows)
