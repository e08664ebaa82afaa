"""The expert-parallel token dispatcher: exchange counts, all_to_all_single with uneven splits,
local experts, reverse all-to-all. Works on gloo (CPU) and NCCL (GPU); autograd flows through
both exchanges.

Shape legend: N rows this rank sends (sorted by dispatch slot = owner rank, then local expert),
M rows it receives, d width, R ranks of the expert-parallel group, L experts per rank.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mm_moe.parallel.placement import ExpertPlacement


class CommTimer:
    """Seconds spent in the exchanges, forward and backward, while `enabled` (benchmarks:
    it synchronizes CUDA around each exchange, so it is off in training)."""

    def __init__(self):
        self.enabled, self.seconds = False, 0.0

    def __call__(self, fn, *args):
        if not self.enabled:
            return fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def _all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange. Every rank of
    the group must call it (forward and backward), also with zero rows to send or receive."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, timer: CommTimer):
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), group, timer
        return timer(_all_to_all, x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_x = ctx.timer(_all_to_all, grad, in_splits, out_splits, ctx.group)
        return grad_x, None, None, None, None


class AllToAllDispatcher:
    """Sends each row to the rank that owns its expert, runs the local experts, sends back.

    The MoE layer sorts rows by `slot_of_expert` (owner rank, then local expert) and hands
    rows plus per-slot counts; the local `GroupedExperts` holds this rank's L experts.
    """

    def __init__(self, placement: ExpertPlacement, group, device: torch.device):
        self.placement, self.group = placement, group
        self.ep_size = placement.ep_size
        self.num_local = placement.experts_per_rank
        self.slot_of_expert = placement.slot_of_expert().to(device)
        self.rank = dist.get_rank(group)
        self.timer = CommTimer()

    def _gather_sizes(self, sizes_K: torch.Tensor) -> torch.Tensor:
        """[R, K]: every EP rank's group sizes (a collective, no host sync of its own)."""
        out_RK = sizes_K.new_empty((self.ep_size * sizes_K.numel(),))
        # all_gather_single is the newer name of all_gather_into_tensor (deprecated since).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out_RK, sizes_K.contiguous(), group=self.group)
        return out_RK.view(self.ep_size, -1)

    def prepare(self, tokens) -> None:
        """Before the forward first reads its group sizes: have them gathered from every EP
        rank in the same host sync, so that expert choice knows every rank's capacities (the
        splits of its all-to-all) without a count exchange per layer."""
        tokens.share_sizes(self._gather_sizes, self.rank)

    def runs(self, x_Nd: torch.Tensor, runs_R: list[list[tuple[int, int]]], experts):
        """Expert choice: rows in global expert order, group g's E_g experts taking C rows
        each, where rank r's C for group g is runs_R[r][g] (every rank knows every rank's:
        static splits, no count exchange, no host sync). Rows are reordered by views and one
        cat per direction: to owner rank (each owns a contiguous share of every group),
        exchanged, regrouped by local expert for the batched GEMMs, and back the same way."""
        R, me = self.ep_size, self.rank
        share_G = [E // R for E, _ in runs_R[me]]
        caps_RG = [[C for _, C in runs] for runs in runs_R]
        G = len(share_G)
        # In: per group g, per owner q, the C_g(me) rows of each of q's share_g experts.
        # Sent: per owner q, per group g.
        mine = [share_G[g] * caps_RG[me][g] for g in range(G)]
        pieces_GQ = x_Nd.split([mine[g] for g in range(G) for _ in range(R)])
        x_send = torch.cat([pieces_GQ[g * R + q] for q in range(R) for g in range(G)])
        send_splits = [sum(mine)] * R
        recv_splits = [sum(share_G[g] * caps_RG[r][g] for g in range(G)) for r in range(R)]
        x_recv = AllToAll.apply(x_send, recv_splits, send_splits, self.group, self.timer)
        # Received: per source r, per group g, per local expert j, C_g(r) rows. The GEMMs
        # want them per group g, per local expert j, then per source.
        recv_keys = [(r, g, j) for r in range(R) for g in range(G) for j in range(share_G[g])]
        by_expert = sorted(recv_keys, key=lambda key: (key[1], key[2], key[0]))
        recv_at = {key: i for i, key in enumerate(recv_keys)}
        expert_at = {key: i for i, key in enumerate(by_expert)}
        pieces = x_recv.split([caps_RG[r][g] for r, g, _ in recv_keys])
        x_local = torch.cat([pieces[recv_at[key]] for key in by_expert])
        local_runs = [(share_G[g], sum(caps_RG[r][g] for r in range(R))) for g in range(G)]
        y_local = experts.forward_runs(x_local, local_runs)
        # Back: per source again, the reverse exchange, then global expert order.
        pieces = y_local.split([caps_RG[r][g] for r, g, _ in by_expert])
        y_send = torch.cat([pieces[expert_at[key]] for key in recv_keys])
        y_recv = AllToAll.apply(y_send, send_splits, recv_splits, self.group, self.timer)
        back_pieces = y_recv.split([mine[g] for q in range(R) for g in range(G)])
        return torch.cat([back_pieces[q * G + g] for g in range(G) for q in range(R)])

    def _exchange_counts(self, send_counts_RL: torch.Tensor) -> torch.Tensor:
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=self.group)
        return recv_counts_RL

    def __call__(self, x_Nd: torch.Tensor, counts_S: torch.Tensor, experts) -> torch.Tensor:
        R, L = self.ep_size, self.num_local
        assert counts_S.numel() == R * L and experts.num_experts == L
        send_counts_RL = counts_S.view(R, L)
        # recv_counts_RL[r, l]: rows rank r sends to this rank's local expert l.
        recv_counts_RL = self.timer(self._exchange_counts, send_counts_RL)
        # The layer's one host sync: the splits, and the local experts' counts with them.
        counts = torch.cat([send_counts_RL.sum(1), recv_counts_RL.reshape(-1)]).tolist()
        send_splits, recv_RL = counts[:R], [counts[R + r * L : R + (r + 1) * L] for r in range(R)]
        recv_splits = [sum(row) for row in recv_RL]
        x_Md = AllToAll.apply(x_Nd, recv_splits, send_splits, self.group, self.timer)
        # Received rows come grouped by source rank, then local expert: regroup by local
        # expert (stable, so each expert sees rank 0's rows first) for the grouped GEMM.
        local_M = torch.arange(L, device=x_Nd.device).repeat(R)
        local_M = local_M.repeat_interleave(
            recv_counts_RL.reshape(-1), output_size=sum(recv_splits)
        )
        order_M = torch.argsort(local_M, stable=True)
        local_counts = [sum(col) for col in zip(*recv_RL)]  # known here: no second sync
        y_Md = experts(x_Md.index_select(0, order_M), recv_counts_RL.sum(0), local_counts)
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        y_Md = y_Md.index_select(0, inverse_M)
        return AllToAll.apply(y_Md, send_splits, recv_splits, self.group, self.timer)
