"""Exact training FLOPs per token, per modality, from the config alone.

Convention (Kaplan / Chinchilla / PaLM MFU): 2 FLOPs per multiply-accumulate of every matmul;
elementwise work (norms, RoPE, softmax, SiLU, gating, losses) and the embedding lookup are not
counted. What is counted, per token of a modality and per layer:

- attention projections q, k, v, o (grouped-query: k and v have n_kv_heads heads);
- attention itself, QK^T and AV: 2 x n_heads x head_dim MACs per key the token attends to;
  `attention="causal"` counts (S + 1) / 2 keys on average over the S positions of a row (the
  work a causal kernel does), `"full"` counts all S (a masked dense kernel, e.g. SDPA with a
  document mask on CPU); `batch_flops` counts a batch's own keys instead: inside each
  document where the kernel skips masked blocks (FlexAttention), causal over the row
  otherwise, for its non-padding tokens of each modality (MFU);
- the FFN: dense SwiGLU (3 d f), or the MoE layer: the router of the token's group (d x E),
  `expected_experts_per_token` experts (3 d h each; expert choice with capacity factor c
  takes c x top_k x granularity per token on average over the group), shared experts, and
  the expert-choice auxiliary routers (d x a + a x E);
- mixture-of-depths layers: every token pays the MoD router (d) and its auxiliary router
  (d x a + a); the block's work is paid by a `capacity` fraction of the tokens, and they
  attend only among the selected tokens (capacity x S keys);
- the output layer (d x V).

Backward = 2 x forward for every matmul on the gradient path (input and weight gradients),
except the auxiliary routers, whose input is detached: their first matmul needs only the
weight gradient (1x), the second both (2x). Untied (MoT) parts do not change per-token work.

A mixed expert group serves both modalities, and expert choice may give one modality more
experts per token than the other; the counts here use the group's average for both.
"""

from __future__ import annotations

from typing import Literal

from mm_moe.errors import UserError
from mm_moe.modality import MODALITIES


def _block_macs(
    cfg, moe, index: int, keys: float, experts_per_token: dict | None = None
) -> dict[str, dict[str, float]]:
    """Forward MACs of one block for one token of each modality, by part, with the token
    attending to `keys` keys. `experts_per_token[(layer, group)]`, where given, replaces the
    configured expectation (the pairs a step actually computed)."""
    d, hd = cfg.d_model, cfg.head_dim
    proj = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    scores = 2 * cfg.n_heads * hd * keys
    out = {}
    for mi, m in enumerate(MODALITIES):
        parts = {"attention_proj": proj, "attention_scores": scores}
        if moe.is_moe_layer(index):
            h = cfg.ffn_dim // moe.granularity
            group = next(g for g in moe.groups() if mi in g.modalities)
            name, n_groups = group.name, len(moe.groups())
            n_all = sum(g.num_experts for g in moe.groups())
            # Every group's router runs on every token, as one matmul (moe/layer.py).
            parts["router"] = d * n_all
            ept = (experts_per_token or {}).get((index, name), moe.expected_experts_per_token())
            parts["experts"] = ept * 3 * d * h
            parts["shared_experts"] = moe.shared_experts * 3 * d * h
            if moe.router == "expert_choice":
                a = moe.aux_router_hidden
                # Every group's auxiliary router on every token, batched: the first layers
                # stacked, the second block-diagonal as one matmul (moe/aux_router.py).
                parts["aux_router_in"] = d * a * n_groups  # detached input: weight grad only
                parts["aux_router_out"] = a * n_groups * n_all
        else:
            parts["ffn"] = 3 * d * cfg.ffn_dim
        out[m] = parts
    return out


def flops_breakdown(
    cfg,
    moe,
    seq_len: int,
    attention: Literal["causal", "full"] = "causal",
    experts_per_token: dict | None = None,
    keys_per_token: float | None = None,
) -> dict[str, dict[str, float]]:
    """Per modality: forward and backward FLOPs per token by part, and their totals.

    `cfg` is a ModelConfig with its vocab_size resolved, `moe` an MoEConfig;
    `experts_per_token` as in `_block_macs`; `keys_per_token`, where given, replaces the keys
    `attention` implies with a batch's mean (mixture-of-depths layers: its capacity share)."""
    if attention not in ("causal", "full"):
        raise UserError(f"attention={attention!r} must be 'causal' or 'full'")
    if seq_len < 1:
        raise UserError(f"seq_len={seq_len} must be positive")
    if keys_per_token is not None:
        keys_of = lambda s: keys_per_token * s / seq_len
    else:
        keys_of = lambda s: (s + 1) / 2 if attention == "causal" else s
    fwd = {m: {} for m in MODALITIES}
    bwd = {m: {} for m in MODALITIES}

    def add(m: str, part: str, macs: float, backward_factor: float) -> None:
        fwd[m][part] = fwd[m].get(part, 0.0) + 2 * macs
        bwd[m][part] = bwd[m].get(part, 0.0) + 2 * macs * backward_factor

    for i in range(cfg.n_layers):
        mod = i in cfg.mod.layers
        c = cfg.mod.capacity if mod else 1.0
        # Training MoD takes max(1, int(capacity x S)) tokens of each row.
        selected = max(1, int(c * seq_len)) if mod else seq_len
        frac = selected / seq_len
        block = _block_macs(cfg, moe, i, keys_of(selected), experts_per_token)
        for m in MODALITIES:
            for part, macs in block[m].items():
                add(m, part, frac * macs, 1.0 if part == "aux_router_in" else 2.0)
            if mod:
                a = cfg.mod.aux_router_hidden
                add(m, "mod_router", cfg.d_model, 2.0)
                add(m, "aux_router_in", cfg.d_model * a, 1.0)
                add(m, "aux_router_out", a, 2.0)
    for m in MODALITIES:
        add(m, "lm_head", cfg.d_model * cfg.vocab_size, 2.0)
    out = {}
    for m in MODALITIES:
        f, b = sum(fwd[m].values()), sum(bwd[m].values())
        out[m] = {
            "forward": f,
            "backward": b,
            "total": f + b,
            "forward_parts": fwd[m],
            "backward_parts": bwd[m],
        }
    return out


def training_flops_per_token(
    cfg,
    moe,
    seq_len: int,
    attention: Literal["causal", "full"] = "causal",
    experts_per_token: dict | None = None,
    keys_per_token: float | None = None,
) -> dict[str, float]:
    """Forward + backward FLOPs per token of each modality."""
    parts = flops_breakdown(cfg, moe, seq_len, attention, experts_per_token, keys_per_token)
    return {m: v["total"] for m, v in parts.items()}


def experts_per_token_of(stats: dict) -> dict[tuple[int, str], float]:
    """{(layer, group): routed pairs / group tokens} from a step's routing statistics
    (`moe/l<i>/<group>/pairs` and `/tokens`, averaged alike, so their ratio is exact)."""
    out = {}
    for key, pairs in stats.items():
        if key.startswith("moe/l") and key.endswith("/pairs"):
            layer, group = key[len("moe/l") : -len("/pairs")].split("/")
            tokens = stats.get(key[: -len("pairs")] + "tokens", 0.0)
            if tokens:
                out[(int(layer), group)] = pairs / tokens
    return out


def batch_flops(
    cfg, moe, seq_len: int, profile, skips_masked: bool, experts_per_token: dict | None = None
) -> dict[str, float]:
    """Training FLOPs of a batch from its TokenProfile (data/batch.py): each modality's
    non-padding tokens x its FLOPs per token, attention over the keys the batch's real tokens
    attend to: inside their documents where the kernel skips masked blocks (`skips_masked`:
    FlexAttention with document masks), causal over the whole row otherwise. Attention work is
    linear in the keys, so the batch's mean keys per token give its exact total."""
    tokens = max(profile.tokens, 1)
    keys = (profile.document_keys if skips_masked else profile.causal_keys) / tokens
    per_token = training_flops_per_token(
        cfg, moe, seq_len, experts_per_token=experts_per_token, keys_per_token=keys
    )
    out = {f"flops_per_token_{m}": per_token[m] for m in MODALITIES}
    out["flops_step"] = sum(n * per_token[m] for m, n in zip(MODALITIES, profile.tokens_M))
    return out


class FlopsMeter:
    """Cumulative training FLOPs of a run: per modality, tokens x FLOPs per token; the state
    is one number per modality, saved with checkpoints.

    With `model` = (ModelConfig, MoEConfig, seq_len), the FLOPs per token of each step use the
    experts per token the step actually computed (expert-choice capacity rounds down, and is
    at least one token per expert), else the fixed `per_token`. Given the step's TokenProfile,
    its attention keys too (`batch_flops`), and `flops_step`, the step's FLOPs (for MFU): the
    batch's non-padding input tokens of each modality, which the cumulative totals add up (one
    source: the sum of `flops_step` over the steps is `flops_cumulative`). Without a profile,
    the tokens are the loss-bearing targets of each modality (train_step's `tokens_<m>`).
    `skips_masked`: the attention kernel skips masked blocks (FlexAttention, document masks).
    """

    def __init__(
        self,
        per_token: dict[str, float],
        state: dict | None = None,
        model: tuple | None = None,
        skips_masked: bool = False,
    ):
        self.per_token, self.model, self.skips_masked = per_token, model, skips_masked
        self.totals = {m: 0.0 for m in MODALITIES}
        if state:
            self.totals.update({m: float(state.get(m, 0.0)) for m in MODALITIES})

    def update(self, stats: dict, profile=None) -> dict[str, float]:
        """Add one step (train_step's `tokens_<modality>` and routing statistics, and the
        global batch's TokenProfile where known); returns the metrics to log."""
        per_token, step = self.per_token, {}
        used = experts_per_token_of(stats) if self.model is not None else {}
        if self.model is not None and profile is not None:
            cfg, moe, seq_len = self.model
            step = batch_flops(cfg, moe, seq_len, profile, self.skips_masked, used or None)
            per_token = {m: step[f"flops_per_token_{m}"] for m in MODALITIES}
        elif used:
            cfg, moe, seq_len = self.model
            per_token = training_flops_per_token(cfg, moe, seq_len, experts_per_token=used)
        if "flops_step" in step:
            tokens = dict(zip(MODALITIES, profile.tokens_M))  # what flops_step counts
        else:
            tokens = {m: stats.get(f"tokens_{m}", 0) for m in MODALITIES}
        for m in MODALITIES:
            self.totals[m] += tokens[m] * per_token[m]
        out = {f"flops_cumulative_{m}": v for m, v in self.totals.items()}
        out["flops_cumulative"] = sum(self.totals.values())
        out.update({f"flops_per_token_{m}": v for m, v in per_token.items()})
        if "flops_step" in step:
            out["flops_step"] = step["flops_step"]
        return out

    def state_dict(self) -> dict:
        return dict(self.totals)
