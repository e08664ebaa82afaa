"""The CUDA-only branches on one GPU: the MoE layer in bf16 against the naive reference for
every router (and that Hopper takes the grouped GEMM), FlexAttention forward and backward
against SDPA, a forward without host syncs, and a short MoMa training run. Skipped without
CUDA; `make gpu-check` runs them."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from mm_moe.model.attention_mask import AttentionMask
from mm_moe.model.config import ModelConfig
from mm_moe.model.context import ForwardContext
from tests.helpers import metrics, train
from tests.unit.test_moe_layer import CASES, _inputs, _layer, _naive

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _hopper() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0) and hasattr(torch, "_grouped_mm")


@pytest.mark.parametrize(
    "name",
    ["ec_sigmoid_moma", "ec_softmax_mixed", "ec_granular_shared", "tc_softmax_top2", "tc_capacity"],
)
def test_moe_layer_bf16_on_gpu_equals_the_naive_reference(name):
    cfg = replace(CASES[name], gemm="auto")
    layer = _layer(cfg).train()
    with torch.no_grad():  # bf16-exact weights and inputs: both sides see the same values
        for p in layer.parameters():
            p.copy_(p.bfloat16().float())
    reference = copy.deepcopy(layer)
    gpu = copy.deepcopy(layer).cuda().bfloat16()
    x, modality, valid = _inputs(B=2, S=32)
    x = x.bfloat16().float()
    x_gpu = x.cuda().bfloat16().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = gpu(x_gpu, ForwardContext.for_layer(modality.cuda(), valid.cuda()))
    want = _naive(reference, x_ref, modality, valid, training=True)
    torch.testing.assert_close(out.float().cpu(), want, atol=5e-2, rtol=5e-2)
    grad = torch.randn_like(want)
    (out.float() * grad.cuda()).sum().backward()
    (want * grad).sum().backward()
    torch.testing.assert_close(x_gpu.grad.float().cpu(), x_ref.grad, atol=5e-2, rtol=5e-2)
    expected = "grouped_mm" if _hopper() else "padded"
    assert gpu.experts.last_path == expected


def _packed(B, S, docs, device):
    g = torch.Generator().manual_seed(S + docs)
    doc = torch.sort(torch.randint(0, docs, (B, S), generator=g), dim=1).values
    return doc.to(device)


@pytest.mark.parametrize("S", [256, 200])
def test_flex_attention_forward_and_backward_equal_sdpa(S):
    from mm_moe.model.attention import attend

    B, H, K, D = 2, 8, 2, 64
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, h, S, D, generator=g).cuda() for h in (H, K, K)]
    doc = _packed(B, S, 5, "cuda")
    results = {}
    for backend in ("sdpa", "flex"):
        inputs = [t.clone().requires_grad_() for t in qkv]
        out = attend(*inputs, AttentionMask.build(doc, backend))
        out.backward(torch.ones_like(out))
        results[backend] = (out, *[t.grad for t in inputs])
    for a, b in zip(results["flex"], results["sdpa"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_dense_forward_and_backward_make_no_host_sync(attention):
    cfg = ModelConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attention=attention
    )
    model = cfg.build().cuda()
    ids = torch.randint(0, 64, (2, 128), device="cuda")
    doc = _packed(2, 128, 3, "cuda")
    model(ids, None, doc).logits.float().sum().backward()  # warm-up (compiles flex)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for doc_ids in (None, doc):
            model(ids, None, doc_ids).logits.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_tiny_moma_trains_on_one_gpu_with_flex_and_grouped_gemm(tmp_path):
    train(
        tmp_path,
        "experiment=tiny_moma",
        "trainer.max_steps=20",
        "trainer.device=cuda",
        "trainer.precision=bf16",
        "trainer.peak_flops=0",
        "optim.lr=3e-3",
    )
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[0]["attention"] == "flex"
    assert rows[0]["moe/gemm"] == ("grouped_mm" if _hopper() else "padded")
