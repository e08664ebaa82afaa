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
        self.timer = CommTimer()

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
        counts = torch.stack([send_counts_RL.sum(1), recv_counts_RL.sum(1)]).tolist()
        send_splits, recv_splits = counts
        x_Md = AllToAll.apply(x_Nd, recv_splits, send_splits, self.group, self.timer)
        # Received rows come grouped by source rank, then local expert: regroup by local
        # expert (stable, so each expert sees rank 0's rows first) for the grouped GEMM.
        local_M = torch.arange(L, device=x_Nd.device).repeat(R)
        local_M = local_M.repeat_interleave(
            recv_counts_RL.reshape(-1), output_size=sum(recv_splits)
        )
        order_M = torch.argsort(local_M, stable=True)
        y_Md = experts(x_Md.index_select(0, order_M), recv_counts_RL.sum(0))
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        y_Md = y_Md.index_select(0, inverse_M)
        return AllToAll.apply(y_Md, send_splits, recv_splits, self.group, self.timer)
