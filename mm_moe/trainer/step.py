"""One optimizer step over this rank's micro-batches, with exact global-batch loss accounting.

The objective is the mean over every loss-bearing token of the whole global batch, not a mean of
micro-batch means: each micro-batch contributes sum(token losses) / N_global, where N_global is
all-reduced once at the start of the step. DeepSpeed averages gradients over data-parallel ranks,
so the per-rank objective is multiplied by the data-parallel size to undo that average.

Before the optimizer may step, one all-reduce gives every rank the step's loss sums, which
ranks saw a non-finite loss or gradient, and the routing statistics; a `StepGuard`
(trainer/guard.py) then decides, the same on every rank, whether the update is applied or
dropped (non-finite values, loss spikes).

Host syncs: everything stays on the device (N_global and the loss scale included) until that
decision, which needs the host: one copy then brings the reduced sums, flags, token counts,
grad norms and statistics together, sliced on the host (`_Fetch`), whatever the number of
ranks, modalities or statistics. The one other copy is the grad norm where DeepSpeed computes
it inside its optimizer step (ZeRO-1/2, bf16, the expert-parallel clip).
"""

from __future__ import annotations

import math

import torch

from mm_moe.data.batch import Batch
from mm_moe.modality import MODALITIES, NUM_MODALITIES
from mm_moe.model.losses import chunked_lm_losses, per_token_losses
from mm_moe.model.moe import stat_means
from mm_moe.model.moe.balance import update_expert_biases
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.checkpointing import backward_group
from mm_moe.parallel.deepspeed_fixes import last_grad_norm, local_grads_finite, skip_optimizer_step
from mm_moe.parallel.distributed import all_reduce_sum, flatten_fp64
from mm_moe.parallel.parallelize import unsharded_grad_norm
from mm_moe.trainer.guard import SPREAD_GRADIENTS


def loss_token_counts(batches: list[Batch], device: torch.device) -> torch.Tensor:
    """[M] loss-bearing target tokens per modality in these micro-batches, counted on the device
    by comparisons and sums (a boolean-mask index or `bincount` would make the host wait)."""
    counts_M = torch.zeros(NUM_MODALITIES, dtype=torch.float64, device=device)
    for b in batches:
        mods_BS = b.target_modality_ids_BS.to(device, non_blocking=True)
        mask_BS = b.loss_mask_BS.to(device, non_blocking=True)
        for m in range(NUM_MODALITIES):
            counts_M[m] += ((mods_BS == m) & mask_BS).sum().double()
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


class _Fetch:
    """Device tensors brought to the host in one copy: joined in one fp64 tensor, one
    `.tolist()`, sliced on the host by name."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.layout: dict[str, tuple[int, int]] = {}
        self.size = 0

    def add(self, name: str, value: torch.Tensor | None) -> None:
        if value is None:
            return
        flat = value.detach().reshape(-1).to(torch.float64)
        self.parts.append(flat)
        self.layout[name], self.size = (self.size, flat.numel()), self.size + flat.numel()

    def fetch(self) -> dict[str, list[float]]:
        host = torch.cat(self.parts).tolist() if self.parts else []  # the one copy
        return {name: host[o : o + n] for name, (o, n) in self.layout.items()}


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


def _micro_step(engine, b: Batch, sums: _Sums, z_loss: float, scale: torch.Tensor, num_micro: int):
    """Forward and backward of one micro-batch; its objective is its share of the global
    token mean (sum of token losses x `scale`, a device scalar) plus its aux losses /
    micro-batches."""
    out = engine(*b.model_inputs(), return_hidden=True)
    for name, value in stat_means.weighted(out.stats).items():
        sums.add_stat(name, value)
    ce_BS, z_BS = _token_losses(engine.module, out, b.target_ids_BS, z_loss)
    mask_BS = b.loss_mask_BS.to(ce_BS.dtype)
    objective = (ce_BS * mask_BS).sum()
    if z_BS is not None:
        z_sum = (z_BS * mask_BS).sum()
        objective = objective + z_loss * z_sum
        sums.losses[NUM_MODALITIES] += z_sum.detach().double()
    # The losses are fp32: the scale rounded to fp32, as a Python float scale would be.
    objective = objective * scale.to(objective.dtype)
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


def _agree(engine, sums: _Sums, world: int, rank: int, device, norm) -> tuple[torch.Tensor, dict]:
    """The boundary: one all-reduce carries the loss sums, per rank whether it saw a
    non-finite loss or gradient (decided on the device), and the routing statistics, so
    every rank takes the same decision. Returns the reduced flat tensor ([losses..., bad
    flag per rank..., statistics...]) and the statistics' {name: (offset, shape)} in it.
    `norm`: the norm of every gradient this rank holds where computed already (ZeRO-0 in
    fp32): finite iff they all are (or it overflows fp32, no update to take either), which
    spares a second pass over the gradients."""
    bad_W = torch.zeros(world, dtype=torch.float64, device=device)
    grads_finite = norm.isfinite() if norm is not None else local_grads_finite(engine)
    losses_finite = torch.isfinite(sums.losses).all()
    # 2: this rank's own loss (where a bad batch or device shows); 1: gradients only, which
    # the data-parallel reduction has already spread to every rank.
    bad_W[rank] = torch.where(losses_finite, (~grads_finite.to(device)).to(torch.float64), 2.0)
    stats_K, layout = flatten_fp64(sums.stats, device)
    reduced = all_reduce_sum(torch.cat([sums.losses, bad_W, stats_K.to(device)]))
    offset = sums.losses.numel() + world
    return reduced, {name: (offset + o, shape) for name, (o, shape) in layout.items()}


def _fetch_boundary(engine, sums: _Sums, counts_M, world: int, rank: int, device) -> dict:
    """Everything the host needs at the boundary, in one copy (see `_Fetch`): the reduced
    loss sums and flags, the token counts, the norms computed before `engine.step()` (ZeRO-0
    in fp32; the auxiliary routers', whose gradients this all-reduces), the statistics."""
    aux_routers = getattr(engine, "aux_routers", None)
    norm = unsharded_grad_norm(engine)
    norm_aux = aux_routers.reduce(world) if aux_routers is not None else None  # collective
    reduced, layout = _agree(engine, sums, world, rank, device, norm)
    n_losses = sums.losses.numel()
    fetch = _Fetch()
    fetch.add("losses", reduced[:n_losses])
    fetch.add("loss_sum", reduced[:NUM_MODALITIES].sum())
    fetch.add("bad", reduced[n_losses : n_losses + world])
    fetch.add("counts", counts_M)
    fetch.add("n_global", counts_M.sum())
    fetch.add("norm", norm)
    fetch.add("norm_aux", norm_aux)
    fetch.add("stats", reduced[n_losses + world :])
    host = fetch.fetch()
    base = n_losses + world
    stats = host.pop("stats")
    host["stats"] = {
        name: stats[o - base : o - base + math.prod(shape)] for name, (o, shape) in layout.items()
    }
    return host


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
    world = max(dp_world_size, 1)
    rank = torch.distributed.get_rank() if dp_world_size > 1 else 0
    batches = [b.to(device) for b in batches]
    counts_M = all_reduce_sum(loss_token_counts(batches, device))
    # On the device: reading N_global here would stall the host before the first forward.
    scale = dp_world_size / counts_M.sum().clamp(min=1.0)
    num_micro = len(batches)
    sums = _Sums(device, collects_stats(engine.module))
    for i, b in enumerate(batches):
        _micro_step(engine, b, sums, z_loss, scale, num_micro)
        if i < num_micro - 1:
            engine.step()  # not the accumulation boundary: DeepSpeed only counts micro-steps
    host = _fetch_boundary(engine, sums, counts_M, world, rank, device)
    n_global = max(host["n_global"][0], 1.0)
    loss = host["loss_sum"][0] / n_global
    # Ranks whose own loss went bad where any did: the others' gradients came from them.
    own = [r for r, bad in enumerate(host["bad"]) if bad >= 2]
    bad_ranks = own or [r for r, bad in enumerate(host["bad"]) if bad > 0]
    what = "loss" if own else "gradients"
    if not own and 1 < world == len(bad_ranks):
        what = SPREAD_GRADIENTS
    action = guard.decide(step, loss, bad_ranks, what) if guard is not None else "apply"
    grad_norm, grad_norm_aux = _finish(engine, action, host, world)
    stats = {"loss": loss, "grad_norm": grad_norm, "tokens_loss": int(n_global)}
    aux_routers = getattr(engine, "aux_routers", None)
    if aux_routers is not None and aux_routers.params:
        stats["grad_norm_aux"] = grad_norm_aux  # the auxiliary routers', clipped apart
    losses = host["losses"]
    for m, name in enumerate(MODALITIES):
        count = host["counts"][m]
        stats[f"loss_{name}"] = losses[m] / count if count else float("nan")
        stats[f"tokens_{name}"] = int(count)
    if z_loss > 0:
        stats["z_loss"] = losses[NUM_MODALITIES] / n_global
    if losses[NUM_MODALITIES + 1]:
        stats["aux_loss"] = losses[NUM_MODALITIES + 1] / (num_micro * dp_world_size)
    shapes = {name: value.shape for name, value in sums.stats.items()}
    stats.update(_means(host["stats"], shapes, num_micro * dp_world_size))
    return stats


def _finish(engine, action: str, host: dict, world: int) -> tuple[float, float]:
    """Apply or drop the update as decided; returns (grad norm, auxiliary routers' grad norm),
    NaN for a dropped step."""
    aux_routers = getattr(engine, "aux_routers", None)
    if action != "apply":
        skip_optimizer_step(engine)
        if aux_routers is not None:
            aux_routers.skip()
        _discard_expert_loads(engine.module)
        return float("nan"), float("nan")
    engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
    # Computed inside DeepSpeed's step where not before it: then one more copy.
    grad_norm = host["norm"][0] if "norm" in host else last_grad_norm(engine)
    grad_norm_aux = float("nan")
    if aux_routers is not None:
        grad_norm_aux = aux_routers.step(world, norm=host.get("norm_aux", [None])[0])
    update_expert_biases(engine.module, all_reduce_sum)
    return grad_norm, grad_norm_aux


def _discard_expert_loads(model: torch.nn.Module) -> None:
    """A dropped step's routing loads must not steer the expert biases."""
    for layer in model.modules():
        if isinstance(layer, MoELayer) and hasattr(layer, "load_accum"):
            layer.load_accum.zero_()


def _means(host: dict[str, list[float]], shapes: dict, count: int) -> dict[str, float]:
    """Routing statistics (summed over micro-batches and ranks, on the host) averaged (an
    expert group's per-token ones over its tokens: moe/stat_means.py); vector stats
    (per-expert load) become one metric per element."""
    out = {}
    for name, values in stat_means.means(host, count).items():
        if len(shapes[name]) == 0:
            out[name] = values[0]
        else:
            out.update({f"{name}_e{e}": v for e, v in enumerate(values)})
    return out
