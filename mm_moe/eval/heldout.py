"""Held-out loss and perplexity per modality, with inference routing and training routing.

Expert choice and mixture-of-depths select over the whole batch in training; at inference the
causal auxiliary routers decide (model.eval()). The held-out loss is measured both ways, so the
price of causal routing is visible: `eval/loss_<m>` (inference routing, what generation gets)
and `eval/train_routing/loss_<m>`, with `eval/routing_gap_<m>` = their difference.

Every rank scores its own held-out rows, and the sums are all-reduced. Under expert parallelism
the experts are sharded and each forward exchanges tokens by all-to-all, so every rank must run
the same number of forwards in lockstep: all ranks call `HeldoutEval.__call__` together.

Shape legend: B rows, S positions.
"""

from __future__ import annotations

import math
import random
from dataclasses import fields, replace

import numpy as np
import torch

from mm_moe.data.batch import Batch, TokenProfile
from mm_moe.eval.config import EvalConfig
from mm_moe.modality import MODALITIES, NUM_MODALITIES
from mm_moe.model.losses import per_token_losses
from mm_moe.model.moe import stat_means
from mm_moe.parallel.distributed import all_reduce_sum_to_host

_SUMS, _COUNT = " sums", " count"  # keys no statistic has


def heldout_batches(
    cfg: EvalConfig,
    data,
    tokenizer,
    rank: int,
    dp_world_size: int,
    micro_batch_size: int,
    set_micro_batch_size: int = 0,
) -> list[Batch]:
    """This rank's held-out micro-batches: the same rows at every evaluation, and the same
    held-out set at every world size (a run resumed on other ranks, or runs compared across
    world sizes, score the same rows).

    The set is `eval.num_batches` micro-batches of `set_micro_batch_size` rows (what one
    process would score: eval.micro_batch_size, else the trainer's micro-batch size at world
    size 1), read once in the training process by one stream (no workers) from eval.sources
    with the training data's packing and decoding (the synthetic source without
    eval.sources: fresh synthetic rows from eval.seed). Ranks take every dp_world_size-th row
    and score them in micro-batches of their own size (eval.micro_batch_size, else the
    trainer's), padded with empty rows to one count on every rank: expert parallelism runs
    the forwards in lockstep."""
    micro = cfg.micro_batch_size or micro_batch_size
    set_micro = cfg.micro_batch_size or set_micro_batch_size or micro
    overrides = {"num_workers": 0, "num_streams": 1}
    if cfg.sources:
        overrides.update(source="webdataset", sources=list(cfg.sources))
    held = replace(data, **overrides)
    # Reading must not move the training RNGs (a resumed run reads again after restoring them).
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        loader = held.build(
            cfg.seed,
            0,
            1,
            set_micro,
            set_micro * cfg.num_batches,
            tokenizer,
            "eval.sources" if cfg.sources else "data.sources",
        )
        batches = loader.next()
        if hasattr(loader, "close"):
            loader.close()
    random.setstate(py_state)
    np.random.set_state(np_state)
    return _deal(batches, rank, dp_world_size, micro)


def _deal(batches: list[Batch], rank: int, ranks: int, micro: int) -> list[Batch]:
    """Rows rank, rank + ranks, ... of `batches`, in micro-batches of `micro` rows, the last
    filled with empty rows (no loss, no valid token), as many micro-batches on every rank."""
    rows = {f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in _TENSORS}
    total = next(iter(rows.values())).shape[0]
    count = math.ceil(math.ceil(total / ranks) / micro)
    mine = {name: t[rank::ranks] for name, t in rows.items()}
    padded = {}
    for name, t in mine.items():
        pad = t.new_zeros((count * micro - t.shape[0], *t.shape[1:]))
        padded[name] = torch.cat([t, pad]).split(micro)
    out = []
    for i in range(count):
        fields_ = {name: padded[name][i] for name in padded}
        doc_BS, mod_BS, mask_BS = (
            fields_[k].numpy() for k in ("doc_ids_BS", "modality_ids_BS", "loss_mask_BS")
        )
        one_doc = bool((doc_BS == doc_BS[:, :1]).all())
        profile = TokenProfile.of(mod_BS, doc_BS, mask_BS)  # on the host: no device sync
        out.append(Batch(**fields_, one_document_per_row=one_doc, profile=profile))
    return out


_TENSORS = [f for f in fields(Batch) if f.type in ("torch.Tensor", torch.Tensor)]


@torch.no_grad()
def _score(
    model, batches: list[Batch], real: list[bool], device
) -> tuple[list[float], dict[str, float]]:
    """[2M] summed cross-entropy and token counts per modality over the batches (all ranks),
    and the routing statistics averaged over the `real` batches (not those of empty rows
    only, which pad a rank to the others' count) of every rank."""
    sums = torch.zeros(2 * NUM_MODALITIES, dtype=torch.float64, device=device)
    stat_sums: dict[str, torch.Tensor] = {}
    for b, is_real in zip(batches, real):
        b = b.to(device)
        out = model(*b.model_inputs())
        ce_BS, _ = per_token_losses(out.logits, b.target_ids_BS, 0.0)
        for m in range(NUM_MODALITIES):
            sel_BS = b.loss_mask_BS & (b.target_modality_ids_BS == m)
            # A weighted sum, not a boolean index (which makes the host wait on a GPU).
            sums[m] += (ce_BS.double() * sel_BS).sum()
            sums[NUM_MODALITIES + m] += sel_BS.sum()
        for name, value in stat_means.weighted(out.stats).items():
            if value.dim() == 0:  # every rank sums the same keys (an empty batch adds 0)
                value = value if is_real else torch.zeros_like(value)
                stat_sums[name] = stat_sums.get(name, 0.0) + value.to(device, torch.float64)
    # The batch count rides in the same all-reduce (the sum over ranks is the divisor), and
    # everything comes to the host in one copy.
    count = torch.full((), sum(real), dtype=torch.float64, device=device)  # no host copy
    totals = all_reduce_sum_to_host({**stat_sums, _SUMS: sums, _COUNT: count}, device)
    sums, (count,) = totals.pop(_SUMS), totals.pop(_COUNT)
    return sums, stat_means.means({name: v for name, (v,) in totals.items()}, count)


def _per_modality(prefix: str, sums: list[float]) -> dict[str, float]:
    out = {}
    total, count = 0.0, 0.0
    for m, name in enumerate(MODALITIES):
        s, n = sums[m], sums[NUM_MODALITIES + m]
        total, count = total + s, count + n
        loss = s / n if n else float("nan")
        out[f"{prefix}loss_{name}"] = loss
        out[f"{prefix}ppl_{name}"] = math.exp(min(loss, 50.0)) if n else float("nan")
    out[f"{prefix}loss"] = total / count if count else float("nan")
    return out


def _mean_of(stats: dict[str, float], suffix: str) -> float | None:
    """The mean over layers and groups, of those that had tokens (NaN: none in the batches)."""
    values = [v for k, v in stats.items() if k.endswith(suffix) and not math.isnan(v)]
    return sum(values) / len(values) if values else None


class HeldoutEval:
    """Scores a model on fixed held-out micro-batches; call on every rank together."""

    def __init__(self, batches: list[Batch], device: torch.device):
        self.batches, self.device = batches, device
        # Batches of empty rows only (their profile counts no token) pad this rank to the
        # others' count (heldout_batches).
        self.real = [b.profile is None or b.profile.tokens > 0 for b in batches]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        # Training-mode forwards must leave training untouched: no RNG draws (router noise)
        # and no buffer updates (the aux-loss-free balancing load counter).
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        devices = [self.device] if self.device.type == "cuda" else []
        # Its routing statistics (unprocessed tokens, aux-router accuracy), in both modes.
        flags = {m: m.collect_stats for m in model.modules() if hasattr(m, "collect_stats")}
        for m in flags:
            m.collect_stats = True
        try:
            with torch.random.fork_rng(devices=devices):
                model.eval()
                sums, stats = _score(model, self.batches, self.real, self.device)
                out = _per_modality("eval/", sums)
                out.update(
                    {
                        f"eval/tokens_{m}": int(sums[NUM_MODALITIES + i])
                        for i, m in enumerate(MODALITIES)
                    }
                )
                unprocessed = _mean_of(stats, "/dropped")
                if unprocessed is not None:
                    out["eval/unprocessed"] = unprocessed  # tokens no expert took (aux routers)
                selected = _mean_of(stats, "/selected")
                if selected is not None:
                    out["eval/mod_selected"] = selected
                # Scored for dense models too: a gap there means training-mode forwards
                # differ from inference ones for another reason (which would be a defect).
                model.train()
                sums, stats = _score(model, self.batches, self.real, self.device)
                train = _per_modality("eval/train_routing/", sums)
                for name in ("aux_router_acc", "aux_router_baseline"):
                    value = _mean_of(stats, f"/{name}")
                    if value is not None:
                        train[f"eval/train_routing/{name}"] = value
                out.update(train)
                for m in MODALITIES:
                    out[f"eval/routing_gap_{m}"] = (
                        out[f"eval/loss_{m}"] - out[f"eval/train_routing/loss_{m}"]
                    )
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            model.train(was_training)
            for m, flag in flags.items():
                m.collect_stats = flag
        return out
