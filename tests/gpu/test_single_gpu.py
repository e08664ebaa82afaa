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
from tests.gpu.device import DEVICE, require_device
from tests.helpers import metrics, train
from tests.unit.test_moe_layer import CASES, _inputs, _layer, _naive

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    require_device(request)  # CUDA, or the CPU for the cpu_ok tests (tests/gpu/device.py)


def _hopper() -> bool:
    return (
        DEVICE == "cuda"
        and torch.cuda.get_device_capability() >= (9, 0)
        and hasattr(torch, "_grouped_mm")
    )


@pytest.mark.cpu_ok
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
    gpu = copy.deepcopy(layer).to(DEVICE).bfloat16()
    x, modality, valid = _inputs(B=2, S=32)
    x = x.bfloat16().float()
    x_gpu = x.to(DEVICE).bfloat16().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = gpu(x_gpu, ForwardContext.for_layer(modality.to(DEVICE), valid.to(DEVICE)))
    want = _naive(reference, x_ref, modality, valid, training=True)
    torch.testing.assert_close(out.float().cpu(), want, atol=5e-2, rtol=5e-2)
    grad = torch.randn_like(want)
    (out.float() * grad.to(DEVICE)).sum().backward()
    (want * grad).sum().backward()
    torch.testing.assert_close(x_gpu.grad.float().cpu(), x_ref.grad, atol=5e-2, rtol=5e-2)
    expected = "grouped_mm" if _hopper() else "padded"
    assert gpu.experts.last_path == (expected if DEVICE == "cuda" else "loop")  # bf16 on CPU


def test_grouped_mm_takes_padded_gemms_for_weights_off_a_16_byte_boundary():
    """On Hopper torch._grouped_mm raises on weights not 16-byte aligned (ZeRO's flat buffer
    can leave them so): the experts take the padded GEMMs, with the same result."""
    from mm_moe.model.moe.experts import GroupedExperts
    from tests.unit.test_moe_layer import misalign

    if not _hopper():
        pytest.skip("torch._grouped_mm runs on Hopper only")
    experts = GroupedExperts(4, 64, 128, "grouped_mm").to(DEVICE).bfloat16()
    x = torch.randn(40, 64, device=DEVICE, dtype=torch.bfloat16)
    counts = torch.tensor([9, 0, 21, 10], device=DEVICE)
    want = experts(x, counts)
    misalign(experts)
    got = experts(x, counts)
    assert experts.last_path == "padded"
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


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


def test_sdpa_document_mask_runs_the_memory_efficient_kernel_not_math():
    """model.attention=sdpa with a document mask and GQA on CUDA: K/V repeated for the
    memory-efficient kernel (sdpa_call), never the math kernel, equal to fp32 math on CPU."""
    from torch.profiler import ProfilerActivity, profile

    from mm_moe.model.attention import attend

    B, H, K, S, D = 2, 8, 2, 256, 64
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, h, S, D, generator=g) for h in (H, K, K)]
    doc = _packed(B, S, 5, "cpu")
    want = attend(*qkv, AttentionMask.build(doc, "sdpa"))
    inputs = [t.cuda().bfloat16().requires_grad_() for t in qkv]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = attend(*inputs, AttentionMask.build(doc.cuda(), "sdpa"))
        out.float().sum().backward()
    ops = {e.name for e in prof.events()}
    assert not any("attention_math" in name for name in ops), sorted(ops)
    assert any("efficient_attention" in name or "cudnn_attention" in name for name in ops)
    torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=3e-2)


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


@pytest.mark.cpu_ok
def test_tiny_moma_trains_on_one_gpu_with_flex_and_grouped_gemm(tmp_path):
    train(
        tmp_path,
        "experiment=tiny_moma",
        "trainer.max_steps=20",
        f"trainer.device={DEVICE}",
        "trainer.precision=bf16",
        "trainer.peak_tflops=0",
        "optim.lr=3e-3",
    )
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    if DEVICE == "cuda":  # on CPU: SDPA (no FlexAttention backward) and the GEMM loop
        assert rows[0]["attention"] == "flex"
        assert rows[0]["moe/gemm"] == ("grouped_mm" if _hopper() else "padded")


def test_prefetched_batches_are_pinned_and_reach_the_gpu_non_blocking(monkeypatch):
    """Prefetcher(pin_memory=True), as build_training makes it on CUDA: every tensor of each
    batch (from the thread and from the first call alike) is in pinned memory, and
    `Batch.to(device)` copies it non_blocking into equal tensors on the GPU."""
    from dataclasses import fields

    from mm_moe.data.config import DataConfig
    from mm_moe.data.prefetch import Prefetcher

    def loader():
        return DataConfig(seq_len=16).build(
            seed=3, rank=0, dp_world_size=1, micro_batch_size=2, global_batch_size=4
        )

    plain = loader()
    want = [plain.next() for _ in range(3)]
    prefetcher = Prefetcher(loader(), pin_memory=True, device=torch.device(DEVICE))
    try:
        got = [prefetcher.next() for _ in range(3)]
    finally:
        prefetcher.close()
    copies, real_to = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    for want_step, got_step in zip(want, got):
        assert len(want_step) == len(got_step)
        for want_batch, batch in zip(want_step, got_step):
            tensors = [f.name for f in fields(batch) if torch.is_tensor(getattr(batch, f.name))]
            assert tensors and all(getattr(batch, name).is_pinned() for name in tensors)
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "to", spy)
                moved = batch.to(DEVICE)
            torch.cuda.synchronize()
            for name in tensors:
                assert getattr(moved, name).device.type == "cuda"
                torch.testing.assert_close(getattr(moved, name).cpu(), getattr(want_batch, name))
    assert copies and all(copies)  # every tensor's copy was non_blocking


def test_the_rng_state_saved_is_this_ranks_own_gpus_and_restores_it(monkeypatch):
    """A checkpoint held every visible GPU's RNG state and put them back by index: after a
    resume with another number of GPUs per node a rank got another rank's state (or an
    IndexError with fewer GPUs). It holds the current device's only."""
    from mm_moe.checkpoint import rng

    torch.cuda.init()
    state = rng.capture()
    assert "cuda" not in state and state["cuda_device"].dtype == torch.uint8
    want = torch.rand(4, device="cuda")
    rng.restore(state)
    assert torch.equal(torch.rand(4, device="cuda"), want)
    # a checkpoint of before (every GPU's, by index) still restores this device's
    older = {k: v for k, v in state.items() if k != "cuda_device"}
    older["cuda"] = [state["cuda_device"]] * (torch.cuda.current_device() + 1)
    rng.restore(older)
    assert torch.equal(torch.rand(4, device="cuda"), want)
