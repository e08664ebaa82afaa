"""The FLOPs count: against a count by hand, and against torch's FLOP counter on the model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mm_moe.model.config import ModelConfig
from mm_moe.model.flops import FlopsMeter, flops_breakdown
from mm_moe.model.mod import MoDConfig
from mm_moe.model.moe.config import MoEConfig

CFG = ModelConfig(
    vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=64
)
MOMA = MoEConfig(experts_per_modality={"text": 4, "image": 4}, gemm="loop", aux_router_hidden=8)
MIXED = MoEConfig(experts_per_modality={"mixed": 8}, gemm="loop", aux_router_hidden=8)
TOKEN_CHOICE = MoEConfig(
    experts_per_modality={"text": 2, "image": 2}, router="token_choice", top_k=2, gemm="loop"
)


def test_dense_matches_a_count_by_hand():
    S = 8
    # per layer, multiply-adds per token: q 16x16, k 16x8, v 16x8, o 16x16; QK^T and AV over
    # (8 + 1) / 2 keys, 16 query dims each; SwiGLU 3 x 16 x 32. Output layer 16 x 50.
    per_layer = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 2 * 16 * 4.5 + 3 * 16 * 32
    forward = 2 * (2 * per_layer + 16 * 50)
    for m in ("text", "image"):
        counts = flops_breakdown(CFG, MoEConfig(), S)[m]
        assert counts["forward"] == forward
        assert counts["backward"] == 2 * forward
        assert CFG.flops_per_token(S)[m] == 3 * forward


def test_moma_mod_and_shared_experts_by_hand():
    moe = replace(MOMA, shared_experts=1, capacity_factor=2.0)
    cfg = replace(CFG, mod=MoDConfig(layers=[1], capacity=0.25, aux_router_hidden=4))
    S = 16
    attn = lambda keys: 16 * 16 * 2 + 16 * 8 * 2 + 2 * 16 * keys
    # the MoE FFN: router 16x4, 2 experts and 1 shared (3 x 16 x 32 each), aux router 16x8+8x4
    ffn = 16 * 4 + 3 * (3 * 16 * 32)
    aux = 16 * 8 + 8 * 4
    layer0 = attn(8.5) + ffn + aux
    # MoD layer: a quarter of the tokens (4 of 16) attend among themselves (2.5 keys on
    # average); every token pays the MoD router (16) and its aux router (16x4 + 4x1).
    layer1 = 0.25 * (attn(2.5) + ffn + aux) + 16 + 16 * 4 + 4
    forward = 2 * (layer0 + layer1 + 16 * 50)
    # aux routers' first matmul gets the weight gradient only (detached input)
    backward = 2 * forward - 2 * (16 * 8 + 0.25 * 16 * 8 + 16 * 4)
    counts = flops_breakdown(cfg, moe, S)["image"]
    assert counts["forward"] == pytest.approx(forward)
    assert counts["backward"] == pytest.approx(backward)


def _measured(cfg: ModelConfig, moe: MoEConfig, B: int, S: int) -> tuple[float, dict]:
    """FLOPs torch counts for one training forward + backward, and tokens per modality."""
    torch.manual_seed(0)
    model = cfg.build(moe).train()
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    modality = torch.zeros(B, S, dtype=torch.long)
    modality[:, S // 2 :] = 1  # half image tokens: expert-choice capacities come out exact
    with FlopCounterMode(display=False) as counter:
        out = model(ids, modality)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
        aux = {**out.aux_losses, **out.aux_router_losses}
        (loss + sum(aux.values())).backward()
    tokens = {"text": B * S // 2, "image": B * S // 2}
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # The count leaves out gating, like other elementwise work: dropless token choice sums the
    # gate-weighted expert outputs in the forward and takes the gates' gradient as row-wise
    # [1, d] x [d, 1] dots in the backward (k per token and layer). It is checked to be
    # exactly that, then set aside.
    gating = by_op.pop("aten.bmm", 0)
    if moe.enabled and moe.router == "token_choice":
        assert gating == 2 * cfg.n_layers * B * S * moe.k * cfg.d_model
    else:
        assert gating == 0
    return sum(by_op.values()), tokens


@pytest.mark.parametrize(
    "name,cfg,moe",
    [
        ("dense", CFG, MoEConfig()),
        ("mot", replace(CFG, untie=["ffn", "attention", "norms"]), MoEConfig()),
        ("moma", CFG, MOMA),
        ("mixed8", CFG, MIXED),
        ("token_choice_top2", CFG, TOKEN_CHOICE),
        ("moma_shared_fine", CFG, replace(MOMA, shared_experts=1, granularity=2)),
        (
            "mod",
            replace(CFG, mod=MoDConfig(layers=[1], capacity=0.25, aux_router_hidden=4)),
            MoEConfig(),
        ),
    ],
)
def test_count_matches_torch_flop_counter(name, cfg, moe):
    """Every matmul torch runs in a training step, forward and backward, is in the count.
    (torch's counter does not see SDPA on CPU, so the attention scores are left out.)"""
    B, S = 2, 16
    # The routing-health statistics are monitoring, not training compute: measured apart
    # (a few E x E products per layer) and left out of the count like the rest of logging.
    measured, tokens = _measured(cfg, replace(moe, health_stats=False), B, S)
    counts = flops_breakdown(cfg, moe, S, attention="full")
    expected = 0.0
    for m, n in tokens.items():
        c = counts[m]
        scores = c["forward_parts"]["attention_scores"] + c["backward_parts"]["attention_scores"]
        expected += n * (c["total"] - scores)
    assert measured == pytest.approx(expected, rel=1e-9), name


def test_meter_accumulates_and_resumes():
    meter = FlopsMeter({"text": 10.0, "image": 100.0})
    meter.update({"tokens_text": 3, "tokens_image": 2})
    out = meter.update({"tokens_text": 1, "tokens_image": 1})
    assert {k: v for k, v in out.items() if "cumulative" in k} == {
        "flops_cumulative_text": 40.0,
        "flops_cumulative_image": 300.0,
        "flops_cumulative": 340.0,
    }
    resumed = FlopsMeter({"text": 10.0, "image": 100.0}, meter.state_dict())
    assert resumed.update({})["flops_cumulative"] == 340.0


def test_bad_attention_mode():
    with pytest.raises(ValueError, match="attention"):
        flops_breakdown(CFG, MoEConfig(), 8, attention="sparse")
