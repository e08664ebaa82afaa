"""Training memory: the loss in chunks (never the fp32 [B, S, V] logits saved for backward) and
activation checkpointing (trainer.activation_checkpointing), each equal to the plain path."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch

from mm_moe.data.config import DataConfig
from mm_moe.model.config import MoDConfig, ModelConfig
from mm_moe.model.losses import chunked_lm_losses, per_token_losses
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer
from mm_moe.parallel.aux_router_optim import AuxRouterOptimizer, aux_router_parameters
from mm_moe.parallel.checkpointing import apply_activation_checkpointing
from mm_moe.trainer.config import OptimConfig
from mm_moe.trainer.step import train_step
from tests.unit.test_step_accounting import _LocalEngine

CPU = torch.device("cpu")


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk, z_loss):
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(3, 7, 16, generator=g), torch.randn(41, 16, generator=g)
    targets = torch.randint(0, 41, (3, 7), generator=g)
    weights = torch.rand(2, 3, 7, generator=g)
    results = []
    for fn in (
        lambda h, w: per_token_losses(h @ w.t(), targets, z_loss),
        lambda h, w: chunked_lm_losses(h, w, targets, z_loss, chunk=chunk),
    ):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        ce, z = fn(h, w)
        loss = (ce * weights[0]).sum() + ((z * weights[1]).sum() if z is not None else 0)
        loss.backward()
        results.append((ce, z if z is not None else ce, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def _batches(seq_len: int = 32, micro: int = 2, global_batch: int = 4):
    loader = DataConfig(seq_len=seq_len).build(
        seed=1, rank=0, dp_world_size=1, micro_batch_size=micro, global_batch_size=global_batch
    )
    return loader, loader.micro_batches(0)


def _saved_bytes(fn) -> tuple[int, int]:
    """Bytes of the distinct storages saved for backward while `fn` runs, and the largest
    single saved tensor's element count."""
    storages, largest = {}, [0]

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), largest[0]


def test_the_training_step_never_saves_the_fp32_logits():
    loader, batches = _batches(seq_len=48)
    torch.manual_seed(0)
    model = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32)
    model = model.with_vocab(loader.vocab.size).build()
    B, S = batches[0].input_ids_BS.shape
    _, largest = _saved_bytes(
        lambda: train_step(_LocalEngine(model), batches, 1e-4, dp_world_size=1, device=CPU)
    )
    assert largest < B * S * loader.vocab.size, "a [B, S, V] tensor was saved for backward"


TINY = ModelConfig(
    d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, z_loss=1e-4
)
VARIANTS = {
    "dense": (TINY, MoEConfig()),
    # expert choice with auxiliary routers (trained apart) and routing-health statistics
    "moma_ec": (TINY, MoEConfig(experts_per_modality={"text": 2, "image": 2}, gemm="loop")),
    "moma_tc_bias": (
        TINY,
        MoEConfig(
            experts_per_modality={"text": 2, "image": 2},
            router="token_choice",
            top_k=2,
            gemm="loop",
            bias_update_rate=1e-3,  # load_accum counts each forward's loads
            load_balance_coef=1e-2,
            router_noise=0.5,  # drawn again on recompute: the same numbers
        ),
    ),
    "mod": (
        replace(TINY, mod=MoDConfig(layers=[1], capacity=0.5, aux_router_hidden=8)),
        MoEConfig(),
    ),
    "dense_1_layer": (replace(TINY, n_layers=1), MoEConfig()),  # compile once, quickly
}


@functools.cache
def _step(name: str, mode: str, compile_: bool = False):
    cfg, moe = VARIANTS[name]
    loader, batches = _batches()
    torch.manual_seed(0)
    model = cfg.with_vocab(loader.vocab.size).build(moe)
    if compile_:
        from mm_moe.parallel.compile import compile_blocks

        compile_blocks(model)
    apply_activation_checkpointing(model, mode)
    engine = _LocalEngine(model)
    aux = []  # the auxiliary routers' gradients, as their optimizer steps with them
    if aux_router_parameters(model):
        engine.aux_routers = AuxRouterOptimizer(model, OptimConfig(), 10)
        real_step = engine.aux_routers.step

        def step(world_size, opt=engine.aux_routers, **kwargs):
            aux.extend(g.clone() for g in opt._grads)
            return real_step(world_size, **kwargs)

        engine.aux_routers.step = step
    aux_params = {id(p) for p in aux_router_parameters(model).values()}
    calls = {"n": 0}
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    torch.manual_seed(1)  # router noise, where configured, draws the same numbers
    stats = train_step(engine, batches, cfg.z_loss, dp_world_size=1, device=CPU)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [m.load_accum.clone() for m in model.modules() if isinstance(m, MoELayer)]
    assert not any(id(p) in aux_params for n, p in model.named_parameters() if n in grads)
    return stats, grads, aux, loads, calls["n"] / (len(batches) * len(model.layers))


@pytest.mark.parametrize("name", ["dense", "moma_ec", "moma_tc_bias", "mod"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_losses_grads_and_statistics_of_none(name, mode):
    want = _step(name, "none")
    got = _step(name, mode)
    assert got[0].keys() == want[0].keys()
    for key, value in want[0].items():  # losses, aux losses, routing statistics: once each
        assert got[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    assert got[1].keys() == want[1].keys()
    for key, value in want[1].items():
        torch.testing.assert_close(got[1][key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert len(got[2]) == len(want[2]) and bool(want[2]) == (name in ("moma_ec", "mod"))
    for a, b in zip(got[2], want[2]):  # the auxiliary routers' own gradients
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(got[3], want[3]):  # expert loads (bias balancing) not counted twice
        torch.testing.assert_close(a, b)
    assert want[4] == 1.0
    # full: one forward and one recompute per block, the aux routers' backward included
    assert got[4] == (2.0 if mode == "full" else 1.0), got[4]


def test_checkpointing_composes_with_per_block_compile():
    want = _step("dense_1_layer", "none")
    got = _step("dense_1_layer", "full", compile_=True)
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
    for key, value in want[1].items():
        torch.testing.assert_close(got[1][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_checkpointing_keeps_less_for_backward():
    """The activations kept for backward (distinct storages saved while the step's forward
    runs), measured: full < selective < none."""
    loader, batches = _batches(seq_len=64, micro=4, global_batch=4)
    measured = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = copy.deepcopy(TINY).with_vocab(loader.vocab.size).build()
        apply_activation_checkpointing(model, mode)
        b = batches[0]
        measured[mode], _ = _saved_bytes(
            lambda m=model, b=b: m(*b.model_inputs(), return_hidden=True)
        )
    assert measured["full"] < measured["selective"] < measured["none"], measured
    assert measured["full"] < 0.5 * measured["none"], measured
