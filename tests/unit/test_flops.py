"""The FLOPs count: against a count by hand, and against torch's FLOP counter on the model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mm_moe.model.config import MoDConfig, ModelConfig
from mm_moe.model.flops import FlopsMeter, flops_breakdown
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
    # the MoE FFN: both groups' routers on every token as one matmul, 16x8; 2 experts and 1
    # shared (3 x 16 x 32 each); both groups' aux routers batched: 16x(2x8), then (2x8)x8
    # (block-diagonal, as one matmul)
    ffn = 16 * 8 + 3 * (3 * 16 * 32)
    aux = 16 * 16 + 16 * 8
    layer0 = attn(8.5) + ffn + aux
    # MoD layer: a quarter of the tokens (4 of 16) attend among themselves (2.5 keys on
    # average); every token pays the MoD router (16) and its aux router (16x4 + 4x1).
    layer1 = 0.25 * (attn(2.5) + ffn + aux) + 16 + 16 * 4 + 4
    forward = 2 * (layer0 + layer1 + 16 * 50)
    # aux routers' first matmul gets the weight gradient only (detached input)
    backward = 2 * forward - 2 * (16 * 16 + 0.25 * 16 * 16 + 16 * 4)
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
    # (Expert choice runs its experts as batched GEMMs: there bmm is expert compute.)
    if moe.enabled and moe.router == "token_choice":
        gating = by_op.pop("aten.bmm", 0)
        assert gating == 2 * cfg.n_layers * B * S * moe.k * cfg.d_model
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


# ---- the batch's own FLOPs (MFU) ----


def _packed_rows():
    """Two rows of 12 input positions: documents of 3, 5 and 4 tokens, and of 7 tokens then 5
    of padding; a mix of text and image tokens."""
    import numpy as np

    doc_BS = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [0] * 7 + [1] * 5])
    valid_BS = np.ones((2, 12), dtype=bool)
    valid_BS[1, 7:] = False
    modality_BS = np.array([[0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0], [1] * 4 + [0] * 8])
    return modality_BS, doc_BS, valid_BS


def test_token_profile_counts_real_tokens_and_their_keys_by_hand():
    from mm_moe.data.batch import TokenProfile

    p = TokenProfile.of(*_packed_rows())
    # text: 6 in row 0, 3 real in row 1; image: 6 + 4. Padding (5 positions) is not a token.
    assert p.tokens_M == (9, 10) and p.positions == 24
    # causal over the row: row 0 keys 1..12, row 1 keys 1..7 (its real tokens)
    assert p.causal_keys == sum(range(1, 13)) + sum(range(1, 8))
    # inside documents: 1..3, 1..5, 1..4 and 1..7
    assert p.document_keys == 6 + 15 + 10 + 28


@pytest.mark.parametrize("skips_masked", [True, False])
def test_batch_flops_equal_a_token_by_token_count(skips_masked):
    """Each real token pays its modality's work and attention over its own keys: a naive sum
    over tokens, against batch_flops' mean-keys form."""
    from mm_moe.data.batch import TokenProfile
    from mm_moe.model.flops import batch_flops

    modality_BS, doc_BS, valid_BS = _packed_rows()
    S = 12
    cfg = CFG
    per_key = 3 * 2 * 2 * cfg.n_heads * cfg.head_dim * cfg.n_layers  # fwd+bwd, QK^T and AV
    base = flops_breakdown(cfg, MOMA, S)
    naive = 0.0
    for b in range(2):
        start = 0
        for i in range(S):
            if i and doc_BS[b, i] != doc_BS[b, i - 1]:
                start = i
            if not valid_BS[b, i]:
                continue
            m = ("text", "image")[modality_BS[b, i]]
            c = base[m]
            scores = (
                c["forward_parts"]["attention_scores"] + c["backward_parts"]["attention_scores"]
            )
            keys = i - start + 1 if skips_masked else i + 1
            naive += c["total"] - scores + per_key * keys
    got = batch_flops(cfg, MOMA, S, TokenProfile.of(modality_BS, doc_BS, valid_BS), skips_masked)
    assert got["flops_step"] == pytest.approx(naive, rel=1e-12)


def test_meter_reports_the_step_flops_of_the_batch_mix():
    from mm_moe.data.batch import TokenProfile

    S = 12
    profile = TokenProfile.of(*_packed_rows())
    meter = FlopsMeter(CFG.flops_per_token(S, MOMA), model=(CFG, MOMA, S), skips_masked=True)
    out = meter.update({"tokens_text": 1, "tokens_image": 1}, profile)
    mix = profile.tokens_M[0] * out["flops_per_token_text"]
    mix += profile.tokens_M[1] * out["flops_per_token_image"]
    assert out["flops_step"] == pytest.approx(mix)
    # Attention inside 3- to 7-token documents costs less than causal over 12 positions.
    assert out["flops_per_token_text"] < CFG.flops_per_token(S, MOMA)["text"]


def test_peak_by_exact_device_name_and_override(caplog):
    from mm_moe.trainer.peak import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # "H100" in its name, not the SXM peak
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe", override_tflops=500) == 500e12
    with caplog.at_level("INFO", logger="mm_moe"):
        assert peak_flops("NVIDIA H100 Something New") == 0.0
    assert "MFU is not reported" in caplog.text and "trainer.peak_tflops" in caplog.text


def test_cumulative_flops_are_the_sum_of_the_step_flops():
    """One source: the run's total is what each step reported (its batch's non-padding input
    tokens), not loss-bearing targets counted by target modality."""
    import numpy as np

    from mm_moe.data.batch import TokenProfile

    S = 12
    modality_BS, doc_BS, valid_BS = _packed_rows()
    meter = FlopsMeter(CFG.flops_per_token(S, MOMA), model=(CFG, MOMA, S), skips_masked=True)
    steps, total_M = [], {"text": 0.0, "image": 0.0}
    for k in range(3):
        profile = TokenProfile.of(np.roll(modality_BS, k, axis=1), doc_BS, valid_BS)
        # The loss-bearing targets differ from the input tokens (documents' last tokens,
        # padding): what train_step counts, which must not change the FLOPs.
        out = meter.update({"tokens_text": 4, "tokens_image": 1}, profile)
        steps.append(out["flops_step"])
        for m, n in zip(("text", "image"), profile.tokens_M):
            total_M[m] += n * out[f"flops_per_token_{m}"]
    assert out["flops_cumulative"] == pytest.approx(sum(steps), rel=1e-12)
    for m in ("text", "image"):
        assert out[f"flops_cumulative_{m}"] == pytest.approx(total_M[m], rel=1e-12)
    resumed = FlopsMeter(CFG.flops_per_token(S, MOMA), meter.state_dict(), model=(CFG, MOMA, S))
    assert resumed.update({})["flops_cumulative"] == out["flops_cumulative"]
