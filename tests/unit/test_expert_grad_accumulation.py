"""Expert weight gradients accumulated inside the backward GEMMs (`GroupedExperts.accumulate_grads`,
which mm_moe/parallel sets under ZeRO-0 with the torch optimizer): over several micro-batches
the same `.grad` as autograd's own accumulation, with no separate pass that adds a fresh
gradient into the expert weights' `.grad` (counted with a dispatch mode), and off where a
DeepSpeed optimizer takes gradients out of `.grad` in its hooks."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from mm_moe.model.moe.experts import GroupedExperts
from tests.unit.test_moe_layer import CASES, _batch, _ctx, _layer

# Expert choice at two capacities (the two groups' spans), and the loop path (one-expert
# spans); micro-batches: mixed, text only (the image experts get no rows), mixed again.
FUSABLE = ["ec_sigmoid_moma", "ec_granular_shared", "tc_loop"]
MICRO_BATCHES = ["mixed", "text_only", "all_valid"]


class _AddsInto(TorchDispatchMode):
    """Counts the ops that write into the expert weights' `.grad` (in place or with out=: the
    accumulation, AccumulateGrad's add or the GEMM that adds in place), and out-of-place adds
    shaped as an expert weight (AccumulateGrad's other form, `grad + new`)."""

    def __init__(self, grads: list[torch.Tensor]):
        super().__init__()
        self.storages = {g.untyped_storage().data_ptr() for g in grads}
        self.shapes, self.ops = {tuple(g.shape) for g in grads}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        target = kwargs.get("out", args[0] if name.endswith("_") and args else None)
        if isinstance(target, torch.Tensor):
            if target.untyped_storage().data_ptr() in self.storages:
                self.ops.append(name)
        elif name == "add" and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
            self.ops.append(name)
        return out


def _accumulate(name: str, fused: bool, checkpointed: bool = False):
    """The layer's `.grad`s after the micro-batches, and the ops that added into the expert
    weights' gradients during the backward of each micro-batch after the first; `checkpointed`
    runs the layer under activation checkpointing (its saved weights are detached copies)."""
    layer = _layer(CASES[name]).train()
    experts = [m for m in layer.modules() if isinstance(m, GroupedExperts)]
    assert experts
    for m in experts:
        m.accumulate_grads = fused
    adds = []
    for i, kind in enumerate(MICRO_BATCHES):
        x, modality, valid = _batch(kind)
        ctx = _ctx(modality, valid)
        if checkpointed:
            out = checkpoint(layer, x, ctx, use_reentrant=False)
        else:
            out = layer(x, ctx)
        losses = {**ctx.aux_losses, **ctx.aux_router_losses}
        objective = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        counter = _AddsInto([p.grad for m in experts for p in m.parameters() if i])
        with counter:
            (objective + sum(losses.values())).backward()
        if i:
            adds.append(counter.ops)
    return {n: p.grad for n, p in layer.named_parameters()}, adds


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("name", FUSABLE)
def test_accumulating_in_the_gemm_gives_autograds_gradients(name, checkpointed):
    fused, fused_adds = _accumulate(name, fused=True, checkpointed=checkpointed)
    plain, plain_adds = _accumulate(name, fused=False)
    assert fused.keys() == plain.keys()
    for n in plain:
        assert (fused[n] is None) == (plain[n] is None), n
        if plain[n] is not None:
            torch.testing.assert_close(fused[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)
    # Autograd adds each fresh expert gradient into .grad (2 weights, each micro-batch); the
    # fused backward adds only inside its GEMMs (baddbmm / addmm into .grad).
    for ops in plain_adds:
        assert ops.count("add_") + ops.count("add") >= 2, ops
    for ops in fused_adds:
        assert "add_" not in ops and "add" not in ops, ops
        assert ops and set(ops) <= {"baddbmm", "addmm"}, ops


def test_autograd_grad_and_backward_of_other_inputs_leave_grad_alone():
    """With a gradient in `.grad`, a backward that does not accumulate into the expert weights
    (torch.autograd.grad of them or of the input; backward(inputs=[the input])) gets their
    gradients returned as usual and leaves `.grad` as it was."""
    layer = _layer(CASES["ec_sigmoid_moma"]).train()
    experts = next(m for m in layer.modules() if isinstance(m, GroupedExperts))
    experts.accumulate_grads = True
    x, modality, valid = _batch("mixed")
    x = x.requires_grad_()
    loss = lambda: layer(x, _ctx(modality, valid)).square().sum()  # noqa: E731
    want = torch.autograd.grad(loss(), [experts.w_down, x])
    for p in experts.parameters():
        p.grad = torch.zeros_like(p)
    got = torch.autograd.grad(loss(), [experts.w_down, x])
    torch.testing.assert_close(got, want)
    torch.autograd.grad(loss(), [x])
    loss().backward(inputs=[x])
    assert not any(p.grad.any() for p in experts.parameters())
    loss().backward()  # and a plain backward does add into .grad
    torch.testing.assert_close(experts.w_down.grad, want[0])
    # A post-accumulate-grad hook (how DeepSpeed's ZeRO watches gradients) keeps autograd's
    # own accumulation, so the hook sees every micro-batch's gradient arrive.
    seen = []
    experts.w_down.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    loss().backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], 2 * want[0])
    hooked = []  # a tensor hook sees (and may change) every micro-batch's own gradient
    experts.w_gate_up.register_hook(lambda g: hooked.append(g) or g * 0)
    before = experts.w_gate_up.grad.clone()
    loss().backward()
    assert len(hooked) == 1 and hooked[0].abs().sum() > 0
    torch.testing.assert_close(experts.w_gate_up.grad, before)


def test_inference_and_frozen_experts_run_with_the_flag_on():
    layer = _layer(CASES["ec_sigmoid_moma"]).train()
    experts = next(m for m in layer.modules() if isinstance(m, GroupedExperts))
    experts.accumulate_grads = True
    x, modality, valid = _batch("mixed")
    with torch.inference_mode():
        want = layer(x, _ctx(modality, valid))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, _ctx(modality, valid)), want)
    experts.requires_grad_(False)
    x = x.requires_grad_()
    layer(x, _ctx(modality, valid)).sum().backward()
    assert x.grad is not None and experts.w_down.grad is None


def test_zero0_turns_it_on_and_deepspeed_optimizers_keep_it_off(tmp_path):
    """Through the training builder: ZeRO-0 in fp32 (the torch optimizer reads `.grad`) with
    several micro-batches a step fuses, and token choice then takes the loop (whose backward
    fuses) over torch._grouped_mm on CPU; one micro-batch a step does neither. ZeRO-1/2 and
    DeepSpeed's bf16 optimizer (hooks on each gradient's accumulation) keep it off: checked on
    the engine's answers here (an in-process ZeRO-1 engine would leave DeepSpeed's cached
    process groups behind for later tests; tests/distributed trains ZeRO-1/2 for real)."""
    from types import SimpleNamespace

    from mm_moe.cli import compose
    from mm_moe.parallel.parallelize import fuse_expert_grad_accumulation
    from mm_moe.trainer.build import build_training

    # (micro-batch of the global 16: 4 accumulates, 16 has nothing to accumulate)
    for micro, fused, gemm in ((4, True, "loop"), (16, False, "grouped_mm")):
        cfg = compose(
            [
                "experiment=tiny_moma",
                "moe=moma_4t4i_tc",
                "model.d_model=32",
                "model.n_heads=2",
                "model.n_kv_heads=1",
                "model.ffn_hidden=64",
                "model.n_layers=2",
                "parallel.zero_stage=0",
                f"trainer.micro_batch_size={micro}",
                f"trainer.run_dir={tmp_path / str(micro)}",
                "logging.wandb.mode=disabled",
                "eval=none",
            ]
        )
        training = build_training(cfg)
        try:
            model = training.engine.module
            flags = {m.accumulate_grads for m in model.modules() if isinstance(m, GroupedExperts)}
            assert flags == {fused}, micro
            assert training.facts["moe/gemm"] == gemm, micro
        finally:
            training.checkpointer.close()
            training.metrics.close()
    layer = _layer(CASES["ec_sigmoid_moma"])
    torch_adamw = torch.optim.AdamW(layer.parameters())
    deepspeed_bf16 = type("BF16_Optimizer", (), {"__module__": "deepspeed.runtime.bf16_optimizer"})
    for stage, optimizer in ((1, torch_adamw), (2, torch_adamw), (0, deepspeed_bf16())):
        engine = SimpleNamespace(
            zero_optimization_stage=lambda stage=stage: stage,
            optimizer=optimizer,
            gradient_accumulation_steps=lambda: 4,
        )
        assert fuse_expert_grad_accumulation(layer, engine) == 0, stage
        assert not any(m.accumulate_grads for m in layer.modules() if isinstance(m, GroupedExperts))
    engine = SimpleNamespace(
        zero_optimization_stage=lambda: 0,
        optimizer=torch_adamw,
        gradient_accumulation_steps=lambda: 4,
    )
    assert fuse_expert_grad_accumulation(layer, engine) == 1  # the same layer, a plain ZeRO-0
