"""One optimizer step over this rank's micro-batches, with exact global-batch loss accounting.

The objective is the mean over every loss-bearing token of the whole global batch, not a mean of
micro-batch means: each micro-batch contributes sum(token losses) / N_global, where N_global is
all-reduced once at the start of the step. DeepSpeed averages gradients over data-parallel ranks,
so the per-rank objective is multiplied by the data-parallel size to undo that average.

Before the optimizer may step, one all-reduce gives every rank the step's loss sums and which
ranks saw a non-finite loss or gradient; a `StepGuard` (trainer/guard.py) then decides, the same
on every rank, whether the update is applied or dropped (non-finite values, loss spikes).
"""

from __future__ import annotations

import torch

from mm_moe.data.batch import Batch
from mm_moe.modality import MODALITIES, NUM_MODALITIES
from mm_moe.model.losses import chunked_lm_losses, per_token_losses
from mm_moe.model.moe.balance import update_expert_biases
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.checkpointing import backward_group
from mm_moe.parallel.deepspeed_fixes import last_grad_norm, local_grads_finite, skip_optimizer_step
from mm_moe.parallel.distributed import all_reduce_sum, all_reduce_sum_to_host
from mm_moe.parallel.parallelize import unsharded_grad_norm


def loss_token_counts(batches: list[Batch], device: torch.device) -> torch.Tensor:
    """[M] loss-bearing target tokens per modality in these micro-batches."""
    counts_M = torch.zeros(NUM_MODALITIES, dtype=torch.float64, device=device)
    for b in batches:
        mods = b.target_modality_ids_BS[b.loss_mask_BS]
        counts_M += torch.bincount(mods, minlength=NUM_MODALITIES).to(device, torch.float64)
    return counts_M


class _Sums:
    """What one rank accumulates over its micro-batches: [ce per modality..., z-loss sum,
    aux-loss sum] in fp64, and the routing statistics. On steps that do not log them
    (`collect` false: the model then computes only its host-side pair and token counts) the
    per-loss `aux/` statistics are skipped too, so nothing is fetched from the device."""

    def __init__(self, device: torch.device, collect: bool = True):
        self.losses = torch.zeros(NUM_MODALITIES + 2, dtype=torch.float64, device=device)
        self.stats: dict[str, torch.Tensor] = {}
        self.collect = collect

    def add_stat(self, name: str, value: torch.Tensor) -> None:
        if not self.collect and name.startswith("aux/"):
            return
        self.stats[name] = self.stats[name] + value if name in self.stats else value.clone()


def collects_stats(model: torch.nn.Module) -> bool:
    """Whether the model computes its routing statistics in this step (the trainer turns
    them on for the steps it logs: `collect_stats`)."""
    for m in model.modules():
        flag = getattr(m, "collect_stats", None)
        if flag is not None:
            return bool(flag)
    return True


def _token_losses(model, out, targets_BS: torch.Tensor, z_loss: float):
    """Cross-entropy and z-loss per token, from the final hidden states in chunks (never the
    fp32 [B, S, V] logits saved for backward: model/losses.py), or from logits where the
    model gave them."""
    if out.hidden is None:
        return per_token_losses(out.logits, targets_BS, z_loss)
    return chunked_lm_losses(out.hidden, model.lm_head.weight, targets_BS, z_loss)


def _micro_step(engine, b: Batch, sums: _Sums, z_loss: float, scale: float, num_micro: int):
    """Forward and backward of one micro-batch; its objective is its share of the global
    token mean (sum of token losses x `scale`) plus its aux losses / micro-batches."""
    out = engine(*b.model_inputs(), return_hidden=True)
    for name, value in out.stats.items():
        sums.add_stat(name, value)
    ce_BS, z_BS = _token_losses(engine.module, out, b.target_ids_BS, z_loss)
    mask_BS = b.loss_mask_BS.to(ce_BS.dtype)
    objective = (ce_BS * mask_BS).sum()
    if z_BS is not None:
        z_sum = (z_BS * mask_BS).sum()
        objective = objective + z_loss * z_sum
        sums.losses[NUM_MODALITIES] += z_sum.detach().double()
    objective = objective * scale
    aux_routers = getattr(engine, "aux_routers", None)
    aux_apart = None
    if out.aux_router_losses:
        aux_router = sum(out.aux_router_losses.values())
        if aux_routers is not None:  # trained apart, outside the engine's clip
            aux_apart = aux_router / num_micro  # its backward after the main one
        else:
            objective = objective + aux_router / num_micro
    aux_losses = {**out.aux_losses, **out.aux_router_losses}
    if aux_losses:
        # Aux losses are per-micro-batch means: average them over all micro-batches.
        aux = sum(out.aux_losses.values(), objective.new_zeros(()))
        objective = objective + aux / num_micro
        total = sum(aux_losses.values())
        sums.losses[NUM_MODALITIES + 1] += total.detach().double()
        for name, value in aux_losses.items():
            sums.add_stat(f"aux/{name}", value.detach().float())
    with torch.no_grad():
        for m in range(NUM_MODALITIES):
            sel_BS = mask_BS * (b.target_modality_ids_BS == m)
            sums.losses[m] += (ce_BS.detach() * sel_BS).sum().double()
    # One recompute per checkpointed block for both backward calls (parallel/checkpointing.py)
    with backward_group(engine.module):
        engine.backward(objective, scale_wrt_gas=False)
        if aux_apart is not None:
            aux_routers.backward(aux_apart)


def _agree(engine, losses: torch.Tensor, world: int, rank: int) -> tuple[torch.Tensor, list]:
    """The boundary: one all-reduce carries the loss sums and, per rank, whether it saw a
    non-finite loss or gradient, so every rank takes the same decision."""
    bad_W = torch.zeros(world, dtype=torch.float64, device=losses.device)
    bad_W[rank] = float(not (bool(torch.isfinite(losses).all()) and local_grads_finite(engine)))
    reduced = all_reduce_sum(torch.cat([losses, bad_W]))
    losses, bad_W = reduced[: losses.numel()], reduced[losses.numel() :]
    return losses, [r for r in range(world) if bad_W[r] > 0]


def train_step(
    engine,
    batches: list[Batch],
    z_loss: float,
    dp_world_size: int,
    device: torch.device,
    guard=None,
    step: int = 0,
) -> dict:
    """One optimizer step; `guard` (a StepGuard) may drop the update (then its
    `last_action` is "skip" or "rollback", and the stats' grad_norm is NaN)."""
    rank = torch.distributed.get_rank() if dp_world_size > 1 else 0
    counts_M = all_reduce_sum(loss_token_counts(batches, device))
    n_global = max(float(counts_M.sum()), 1.0)
    num_micro = len(batches)
    sums = _Sums(device, collects_stats(engine.module))
    for i, b in enumerate(batches):
        _micro_step(engine, b.to(device), sums, z_loss, dp_world_size / n_global, num_micro)
        if i < num_micro - 1:
            engine.step()  # not the accumulation boundary: DeepSpeed only counts micro-steps
    losses, bad_ranks = _agree(engine, sums.losses, max(dp_world_size, 1), rank)
    loss = float(losses[:NUM_MODALITIES].sum()) / n_global
    action = guard.decide(step, loss, bad_ranks) if guard is not None else "apply"
    grad_norm = grad_norm_aux = float("nan")
    aux_routers = getattr(engine, "aux_routers", None)
    if action == "apply":
        unsharded = unsharded_grad_norm(engine)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        grad_norm = unsharded if unsharded is not None else last_grad_norm(engine)
        if aux_routers is not None:
            grad_norm_aux = aux_routers.step(max(dp_world_size, 1))
        update_expert_biases(engine.module, all_reduce_sum)
    else:
        skip_optimizer_step(engine)
        if aux_routers is not None:
            aux_routers.skip()
        _discard_expert_loads(engine.module)
    stats = {"loss": loss, "grad_norm": grad_norm, "tokens_loss": int(n_global)}
    if aux_routers is not None and aux_routers.params:
        stats["grad_norm_aux"] = grad_norm_aux  # the auxiliary routers', clipped apart
    for m, name in enumerate(MODALITIES):
        count = float(counts_M[m])
        stats[f"loss_{name}"] = float(losses[m]) / count if count else float("nan")
        stats[f"tokens_{name}"] = int(count)
    if z_loss > 0:
        stats["z_loss"] = float(losses[NUM_MODALITIES]) / n_global
    if float(losses[NUM_MODALITIES + 1]):
        stats["aux_loss"] = float(losses[NUM_MODALITIES + 1]) / (num_micro * dp_world_size)
    stats.update(_mean_stats(sums.stats, num_micro * dp_world_size, device))
    return stats


def _discard_expert_loads(model: torch.nn.Module) -> None:
    """A dropped step's routing loads must not steer the expert biases."""
    for layer in model.modules():
        if isinstance(layer, MoELayer) and hasattr(layer, "load_accum"):
            layer.load_accum.zero_()


def _mean_stats(stat_sums: dict[str, torch.Tensor], count: int, device) -> dict[str, float]:
    """Routing statistics averaged over micro-batches and ranks; vector stats (per-expert load)
    become one metric per element. One all-reduce and one device-to-host copy for all."""
    out = {}
    for name, values in all_reduce_sum_to_host(stat_sums, device).items():
        if stat_sums[name].dim() == 0:
            out[name] = values[0] / count
        else:
            out.update({f"{name}_e{e}": v / count for e, v in enumerate(values)})
    return out
