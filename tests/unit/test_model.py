"""The early-fusion decoder against naive references."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mm_moe.model.attention_mask import AttentionMask
from mm_moe.model.config import ModelConfig
from mm_moe.model.modality_ops import ModalityRows

CFG = ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64
)


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return cfg.build().eval()


def _naive_attention(attn, x_BSd, pos_BS, doc_BS):
    """Per-query loops: softmax over the visible keys of the same document."""
    B, S, _ = x_BSd.shape
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_norm(attn.w_q(x_BSd).view(B, S, H, D)).transpose(1, 2)
    k = attn.k_norm(attn.w_k(x_BSd).view(B, S, K, D)).transpose(1, 2)
    v = attn.w_v(x_BSd).view(B, S, K, D).transpose(1, 2)  # dense: modality ids not needed
    q, k = attn.rope(q, pos_BS), attn.rope(k, pos_BS)
    out = torch.zeros(B, H, S, D)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)  # query head h reads key/value head kv
            for i in range(S):
                js = [j for j in range(i + 1) if doc_BS[b, j] == doc_BS[b, i]]
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] for j in js]) / math.sqrt(D)
                w = scores.softmax(0)
                out[b, h, i] = sum(w[n] * v[b, kv, j] for n, j in enumerate(js))
    return attn.w_o(out.transpose(1, 2).reshape(B, S, H * D))


def test_attention_matches_naive_reference_with_documents():
    model = _model()
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 32)
    doc = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    pos = torch.cat([torch.arange(4), torch.arange(6)]).expand(2, 10).clone()
    pos[1] = torch.arange(10)
    rows = ModalityRows(torch.zeros_like(doc))
    got = attn(x, rows, pos, AttentionMask.build(doc, "sdpa"))
    want = _naive_attention(attn, x, pos, doc)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_output_ignores_future_tokens():
    model = _model()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 97, (2, 7))
    a = model(ids).logits
    b = model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_packed_documents_equal_separate_runs():
    """With document masking and per-document positions, packing changes nothing."""
    model = _model()
    doc_a, doc_b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([doc_a, doc_b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    out = model(packed, doc_ids=doc, position_ids=pos).logits
    torch.testing.assert_close(out[:, :7], model(doc_a).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], model(doc_b).logits, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    model = _model()
    rope = model.rope
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rope8 = type(rope)(8, 64, 10000.0)

    def score(i, j):
        return (rope8(q, torch.tensor([[i]])) * rope8(k, torch.tensor([[j]]))).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = _model()
    mha_cfg = replace(CFG, n_kv_heads=CFG.n_heads)
    mha = mha_cfg.build().eval()
    state = gqa.state_dict()
    D, rep = CFG.head_dim, CFG.n_heads // CFG.n_kv_heads
    for key, value in list(state.items()):
        if key.endswith(("w_k.weight", "w_v.weight")):
            state[key] = (
                value.view(CFG.n_kv_heads, D, -1)
                .repeat_interleave(rep, 0)
                .reshape(CFG.n_heads * D, -1)
            )
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_num_params_matches_built_model(tie, qk_norm):
    cfg = replace(CFG, tie_embeddings=tie, qk_norm=qk_norm)
    model = cfg.build()
    counted = sum(p.numel() for p in model.parameters())
    assert cfg.num_params()["total"] == counted
    assert cfg.num_params()["active"] == {"text": counted, "image": counted}


def test_flops_per_token_is_six_n_plus_attention():
    cfg = CFG
    n_matmul = sum(
        p.numel()
        for n, p in cfg.build().named_parameters()
        if p.dim() == 2 and not n.startswith("embed")
    )
    seq = 32
    # causal: position i attends to i + 1 keys, (seq + 1) / 2 on average
    attention = 3 * 2 * cfg.n_layers * (seq + 1) * cfg.d_model
    assert cfg.flops_per_token(seq)["text"] == 6 * n_matmul + attention


def _naive_post_norm_logits(model, ids_BS):
    """Chameleon's res-post-norm by hand: h = x + norm(attn(x)), then h + norm(ffn(h))."""
    B, S = ids_BS.shape
    pos_BS, doc_BS = torch.arange(S).expand(B, S), torch.zeros(B, S, dtype=torch.long)
    x = model.embed(ids_BS)
    for block in model.layers:
        h = x + block.attn_norm(_naive_attention(block.attn, x, pos_BS, doc_BS))
        x = h + block.ffn_norm(block.ffn(h))
    return model.lm_head(model.norm(x))


def test_post_norm_placement_matches_a_naive_reference_and_trains():
    pre, post = _model(), _model(replace(CFG, norm_placement="post"))  # the same weights
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _naive_post_norm_logits(post, ids)
        torch.testing.assert_close(post(ids).logits, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pre(ids).logits, want, atol=1e-2)  # the placement matters
    # A few AdamW steps on one batch: the loss falls, and every parameter (norms too) learns.
    post.train()
    opt = torch.optim.AdamW(post.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(post(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in post.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_tied_embeddings_share_storage():
    model = _model(replace(CFG, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(d_model=30), "model.d_model"),
        (dict(n_kv_heads=3), "model.n_kv_heads"),
        (dict(vocab_size=-1), "model.vocab_size"),
    ],
)
def test_bad_shapes_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        replace(CFG, **bad)


def test_vocab_smaller_than_data_fails():
    with pytest.raises(ValueError, match="model.vocab_size"):
        CFG.with_vocab(200)
    assert replace(CFG, vocab_size=0).with_vocab(200).vocab_size == 200
