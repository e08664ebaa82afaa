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
import torch.nn.functional as F

from mm_moe.data.batch import Batch
from mm_moe.modality import MODALITIES, NUM_MODALITIES
from mm_moe.model.moe.balance import update_expert_biases
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.distributed import all_reduce_sum
from mm_moe.parallel.engine import (
    last_grad_norm,
    local_grads_finite,
    skip_optimizer_step,
    unsharded_grad_norm,
)


def per_token_losses(
    logits_BSV: torch.Tensor, targets_BS: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy per token in fp32, and logsumexp^2 (the z-loss term) when asked for."""
    logits_BSV = logits_BSV.float()
    ce_BS = F.cross_entropy(
        logits_BSV.flatten(0, 1), targets_BS.flatten(), reduction="none"
    ).view_as(targets_BS)
    z_BS = torch.logsumexp(logits_BSV, dim=-1).pow(2) if z_loss > 0 else None
    return ce_BS, z_BS


def loss_token_counts(batches: list[Batch], device: torch.device) -> torch.Tensor:
    """[M] loss-bearing target tokens per modality in these micro-batches."""
    counts_M = torch.zeros(NUM_MODALITIES, dtype=torch.float64, device=device)
    for b in batches:
        mods = b.target_modality_ids_BS[b.loss_mask_BS]
        counts_M += torch.bincount(mods, minlength=NUM_MODALITIES).to(device, torch.float64)
    return counts_M


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
    # [ce per modality..., z-loss sum, aux-loss sum]
    sums = torch.zeros(NUM_MODALITIES + 2, dtype=torch.float64, device=device)
    grad_norm = None
    stat_sums: dict[str, torch.Tensor] = {}
    faults = guard.faults if guard is not None else None
    for i, b in enumerate(batches):
        if faults is not None and i == 0:
            faults.maybe_kill(step, rank)
            faults.maybe_hang(step, rank)
        b = b.to(device)
        out = engine(*b.model_inputs())
        for name, value in out.stats.items():
            stat_sums[name] = stat_sums[name] + value if name in stat_sums else value.clone()
        ce_BS, z_BS = per_token_losses(out.logits, b.target_ids_BS, z_loss)
        mask_BS = b.loss_mask_BS.to(ce_BS.dtype)
        objective = (ce_BS * mask_BS).sum()
        if z_BS is not None:
            z_sum = (z_BS * mask_BS).sum()
            objective = objective + z_loss * z_sum
            sums[NUM_MODALITIES] += z_sum.detach().double()
        objective = objective * (dp_world_size / n_global)
        if faults is not None and i == 0:
            factor = faults.loss_factor(step, rank)
            if factor != 1.0:  # test-only injection: the logged loss sees it too
                objective = objective * factor
                ce_BS = ce_BS * factor
        if out.aux_losses:
            # Aux losses are per-micro-batch means: average them over all micro-batches.
            aux = sum(out.aux_losses.values())
            objective = objective + aux / num_micro
            sums[NUM_MODALITIES + 1] += aux.detach().double()
            for name, value in out.aux_losses.items():
                key = f"aux/{name}"
                value = value.detach().float()
                stat_sums[key] = stat_sums[key] + value if key in stat_sums else value
        with torch.no_grad():
            for m in range(NUM_MODALITIES):
                sel_BS = mask_BS * (b.target_modality_ids_BS == m)
                sums[m] += (ce_BS.detach() * sel_BS).sum().double()
        engine.backward(objective, scale_wrt_gas=False)
        if i < num_micro - 1:
            engine.step()  # not the accumulation boundary: DeepSpeed only counts micro-steps
    # The boundary: one all-reduce carries the loss sums and, per rank, whether it saw a
    # non-finite loss or gradient, so every rank takes the same decision.
    world = dp_world_size if dp_world_size > 1 else 1
    bad_W = torch.zeros(world, dtype=torch.float64, device=device)
    bad_W[rank] = float(not (bool(torch.isfinite(sums).all()) and local_grads_finite(engine)))
    reduced = all_reduce_sum(torch.cat([sums, bad_W]))
    sums, bad_W = reduced[: sums.numel()], reduced[sums.numel() :]
    loss = float(sums[:NUM_MODALITIES].sum()) / n_global
    bad_ranks = [r for r in range(world) if bad_W[r] > 0]
    action = guard.decide(step, loss, bad_ranks) if guard is not None else "apply"
    if action == "apply":
        grad_norm = unsharded_grad_norm(engine)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        update_expert_biases(engine.module, all_reduce_sum)
    else:
        skip_optimizer_step(engine)
        _discard_expert_loads(engine.module)
    stats = {
        "loss": loss,
        "grad_norm": _grad_norm(engine, grad_norm, action),
        "tokens_loss": int(n_global),
    }
    for m, name in enumerate(MODALITIES):
        count = float(counts_M[m])
        stats[f"loss_{name}"] = float(sums[m]) / count if count else float("nan")
        stats[f"tokens_{name}"] = int(count)
    if z_loss > 0:
        stats["z_loss"] = float(sums[NUM_MODALITIES]) / n_global
    if float(sums[NUM_MODALITIES + 1]):
        stats["aux_loss"] = float(sums[NUM_MODALITIES + 1]) / (num_micro * dp_world_size)
    stats.update(_mean_stats(stat_sums, num_micro * dp_world_size, device))
    return stats


def _grad_norm(engine, unsharded: float | None, action: str) -> float:
    if action != "apply":
        return float("nan")
    return unsharded if unsharded is not None else last_grad_norm(engine)


def _discard_expert_loads(model: torch.nn.Module) -> None:
    """A dropped step's routing loads must not steer the expert biases."""
    for layer in model.modules():
        if isinstance(layer, MoELayer) and hasattr(layer, "load_accum"):
            layer.load_accum.zero_()


def _mean_stats(stat_sums: dict[str, torch.Tensor], count: int, device) -> dict[str, float]:
    """Routing statistics averaged over micro-batches and ranks; vector stats (per-expert load)
    become one metric per element. Every rank has the same keys: they follow from the config."""
    if not stat_sums:
        return {}
    names = sorted(stat_sums)
    flat = torch.cat([stat_sums[n].reshape(-1).to(device, torch.float64) for n in names])
    flat = all_reduce_sum(flat) / count
    out, i = {}, 0
    for name in names:
        n = stat_sums[name].numel()
        values = flat[i : i + n].tolist()
        i += n
        if stat_sums[name].dim() == 0:
            out[name] = values[0]
        else:
            for e, v in enumerate(values):
                out[f"{name}_e{e}"] = v
    return out
