"""Attention for packed documents: FlexAttention (document BlockMask) against SDPA with a
dense mask, one packed row against its documents alone, the causal path for one-document
rows, grouped-query attention without copies, and blocks that compile without graph breaks
(no host syncs in the forward)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mm_moe.data.batch import Batch
from mm_moe.errors import UserError
from mm_moe.model.attention_mask import (
    AttentionMask,
    check_backend,
    resolve_backend,
    sdpa_call,
)
from mm_moe.model.config import ModelConfig

# GQA (4 query heads on 2 key/value heads), MoT-untied projections and norms.
CFG = ModelConfig(
    vocab_size=50,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=64,
    max_seq_len=128,
    untie=["attention", "norms"],
)


def _packed(seed: int, B: int, S: int, max_docs: int):
    """Random rows of documents of random lengths: ids, modality, doc ids, positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, S), generator=g)
    modality = (torch.rand(B, S, generator=g) < 0.5).long()
    doc = torch.sort(torch.randint(0, max_docs, (B, S), generator=g), dim=1).values
    start = torch.ones(B, S, dtype=torch.bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    idx = torch.arange(S).expand(B, S)
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=1).values
    return ids, modality, doc, idx - first


def _models():
    torch.manual_seed(0)
    sdpa = replace(CFG, attention="sdpa").build().eval()
    flex = replace(CFG, attention="flex").build().eval()
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


@torch.no_grad()
def test_flex_attention_forward_equals_the_sdpa_masked_reference():
    sdpa, flex = _models()
    # 40 positions: torch's CPU flex kernel needs the padding to 48 that attend() adds
    for seed, docs in enumerate([4, 1, 9]):
        inputs = _packed(seed, 3, 40, docs)
        want = sdpa(*inputs).logits
        got = flex(*inputs).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@torch.no_grad()
def test_a_packed_row_gives_each_document_its_logits_alone(attention):
    model = replace(CFG, attention=attention).build().eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 50, (1, 13), generator=g), torch.randint(0, 50, (1, 19), generator=g)
    ma, mb = (torch.rand(1, 13, generator=g) < 0.5).long(), (torch.rand(1, 19, generator=g) < 0.5)
    packed = torch.cat([a, b], 1)
    modality = torch.cat([ma, mb.long()], 1)
    doc = torch.tensor([[0] * 13 + [1] * 19])
    pos = torch.cat([torch.arange(13), torch.arange(19)]).unsqueeze(0)
    together = model(packed, modality, doc, pos).logits
    torch.testing.assert_close(together[:, :13], model(a, ma).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 13:], model(b, mb.long()).logits, atol=1e-5, rtol=1e-5)


def test_one_document_rows_take_the_causal_path_and_gqa_copies_nothing(monkeypatch):
    import numpy as np
    import torch.nn.functional as F

    rows = np.arange(2 * 9).reshape(2, 9)
    ones, zeros = np.ones_like(rows, dtype=bool), np.zeros_like(rows)
    single = Batch.from_tokens(rows, zeros, zeros, np.tile(np.arange(9), (2, 1)), ones)
    assert single.one_document_per_row and single.model_inputs()[2] is None
    assert AttentionMask.build(None, "flex").kind == "causal"
    docs = zeros.copy()
    docs[1, 5:] = 1
    packed = Batch.from_tokens(rows, zeros, docs, np.tile(np.arange(9), (2, 1)), ones)
    assert not packed.one_document_per_row and packed.model_inputs()[2] is not None

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw["is_causal"], kw["attn_mask"], kw["enable_gqa"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = replace(CFG, attention="sdpa").build()
    model(*single.model_inputs())
    (q, k, causal, mask, gqa) = calls[0]
    assert causal and mask is None and gqa  # the flash path, K/V not repeated per head
    assert q[1] == 4 and k[1] == 2


def test_sdpa_document_masks_on_cuda_repeat_kv_never_the_math_kernel():
    # CUDA's flash kernel takes no mask and its memory-efficient one no GQA: a dense mask with
    # enable_gqa would fall to the math kernel ([B, H, S, S] fp32 scores).
    assert sdpa_call("cuda", "dense", gqa=True, head_dim=64) == "repeat_kv"
    assert sdpa_call("cuda", "dense", gqa=False, head_dim=64) == "plain"
    assert sdpa_call("cuda", "causal", gqa=True, head_dim=64) == "gqa"  # flash takes GQA
    assert sdpa_call("cpu", "dense", gqa=True, head_dim=64) == "gqa"
    assert sdpa_call("cpu", "causal", gqa=False, head_dim=64) == "plain"
    with pytest.raises(UserError, match="model.attention=flex"):
        sdpa_call("cuda", "dense", gqa=True, head_dim=12)


def test_the_cuda_decision_repeats_kv_per_head_with_equal_outputs(monkeypatch):
    import torch.nn.functional as F

    from mm_moe.model import attention

    model = replace(CFG, attention="sdpa").build().eval()
    inputs = _packed(3, 2, 24, 3)
    with torch.no_grad():
        want = model(*inputs).logits
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], v.shape[1], kw["enable_gqa"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention, "sdpa_call", lambda _, *a: sdpa_call("cuda", *a))
    with torch.no_grad():
        got = model(*inputs).logits
    assert calls and all(c == (4, 4, 4, False) for c in calls)  # K/V copied per query head
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_no_fast_sdpa_kernel_on_cuda_is_a_user_error_naming_flex(monkeypatch):
    """Dense document masks on CUDA forbid SDPA's math kernel; where no other kernel takes the
    shapes, SDPA's "No available kernel" RuntimeError becomes a UserError with the remedy
    (simulated on CPU: the CUDA decision taken, SDPA raising as it does there)."""
    import torch.nn.functional as F

    from mm_moe.model import attention

    def no_kernel(*args, **kwargs):
        raise RuntimeError("No available kernel. Aborting execution.")

    model = replace(CFG, attention="sdpa").build().eval()
    monkeypatch.setattr(attention, "_fast_kernels_only", lambda *a: True)
    monkeypatch.setattr(attention, "sdpa_call", lambda _, *a: sdpa_call("cuda", *a))
    monkeypatch.setattr(F, "scaled_dot_product_attention", no_kernel)
    with torch.no_grad(), pytest.raises(UserError, match="model.attention=flex") as err:
        model(*_packed(3, 2, 24, 3))
    assert "head_dim=8" in str(err.value) and isinstance(err.value.__cause__, RuntimeError)
    # Any other RuntimeError, or the same one off that path, stays what it is.
    monkeypatch.setattr(attention, "_fast_kernels_only", lambda *a: False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="No available kernel"):
        model(*_packed(3, 2, 24, 3))


def test_attention_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("sdpa", torch.device("cuda")) == "sdpa"
    with pytest.raises(UserError, match="model.attention=flex cannot train on CPU"):
        check_backend("flex", torch.device("cpu"), training=True)
    check_backend("flex", torch.device("cpu"), training=False)  # inference is fine


def _ctx(model, inputs):
    from mm_moe.model.context import ForwardContext
    from mm_moe.model.modality_ops import ModalityRows

    ids, modality, doc, pos = inputs
    return ForwardContext(
        modality_ids_BS=modality,
        position_ids_BS=pos,
        doc_ids_BS=doc,
        attn_mask=AttentionMask.build(doc, "sdpa"),
        valid_BS=torch.ones_like(ids, dtype=torch.bool),
        rows=ModalityRows.of(modality, 2, bool(model.cfg.untie)),
    )


@pytest.mark.parametrize("untie", [[], ["ffn", "attention", "norms"]], ids=["dense", "mot"])
def test_dense_and_mot_blocks_compile_without_graph_breaks(untie):
    """fullgraph=True fails on any graph break, a host sync (.item(), int(tensor), .tolist(),
    nonzero) among them: the per-layer position check and per-projection nonzero are gone."""
    torch._dynamo.reset()
    model = replace(CFG, untie=untie).build()
    inputs = _packed(3, 2, 24, 3)
    ctx = _ctx(model, inputs)
    block = model.layers[0]
    x = model.embed(inputs[0])
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, ctx), block(x, ctx))
