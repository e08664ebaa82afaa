"""Optimizer state restored from a checkpoint lies where torch's AdamW keeps it: on each
parameter's device and in its dtype, fused AdamW's `step` on the parameter's device (a CPU
`step` with CUDA parameters is an illegal memory access in the first step after a resume).

Without a GPU the device is made visible with the `meta` device: the optimizer is built over
CPU parameters (fused AdamW refuses others), then the parameters move, as a CUDA run's are
where the checkpoint was saved on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mm_moe.parallel import full_state
from mm_moe.parallel.adam_state import step_on_device
from mm_moe.trainer.config import OptimConfig


def _engine(fused: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    optimizer = OptimConfig(fused=fused, warmup_steps=0).build(model)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return SimpleNamespace(module=model, optimizer=optimizer, aux_routers=None)


@pytest.fixture(autouse=True)
def _swap_params_in_place():
    """`Module.to` keeps each Parameter object (the optimizer's keys) across devices."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def _to(module: nn.Module, where) -> None:
    params = list(module.parameters())
    module.to(where)
    assert all(a is b for a, b in zip(params, module.parameters()))


def _check_layout(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                assert (state[k].device, state[k].dtype) == (p.device, p.dtype), k
            step = state["step"]
            want = p.device if step_on_device(group) else torch.device("cpu")
            assert (step.device, step.dtype) == (want, torch.float32)


@pytest.mark.parametrize("fused", [True, False])
def test_main_optimizer_state_on_the_parameters_device(fused):
    engine = _engine(fused)
    saved = full_state.gather_optimizer(engine)
    _to(engine.module, "meta")  # the same Parameter objects, on another device
    full_state.load_optimizer(engine, saved)
    _check_layout(engine.optimizer)


def test_state_handed_back_by_name_lies_on_the_parameters_device():
    """The checkpoint's way in: `load_local_state` with `local_state`'s dict."""
    engine = _engine(fused=True)
    saved = full_state.local_state(engine)
    _to(engine.module, "meta")
    full_state.load_local_state(engine, saved)
    _check_layout(engine.optimizer)


def test_main_optimizer_state_in_the_parameters_dtype_and_steps_alike():
    reference, resumed = _engine(True), _engine(True)
    saved = full_state.gather_optimizer(resumed)
    for engine in (reference, resumed):
        _to(engine.module, torch.bfloat16)
    for group in reference.optimizer.param_groups:  # what torch's own load would hold
        for p in group["params"]:
            st = reference.optimizer.state[p]
            st.update({k: st[k].to(p.dtype) for k in ("exp_avg", "exp_avg_sq")})
    full_state.load_optimizer(resumed, saved)
    _check_layout(resumed.optimizer)
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    for engine in (reference, resumed):
        engine.module(x).float().square().sum().backward()
        engine.optimizer.step()  # fused AdamW wants one dtype per parameter and its state
    for a, b in zip(reference.module.parameters(), resumed.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_aux_router_state_on_the_parameters_device():
    from mm_moe.model.moe.aux_router import AuxRouter
    from mm_moe.parallel.aux_router_optim import AuxRouterOptimizer

    model = nn.Sequential(AuxRouter(4, 8, 2))
    opt = AuxRouterOptimizer(model, OptimConfig(fused=True, warmup_steps=0), max_steps=10)
    opt.backward(model[0].net(torch.randn(3, 4)).square().sum())
    opt.step(world_size=1)
    moments = opt.moments()
    _to(model, "meta")
    opt.load_moments(moments, step=1)
    _check_layout(opt.optimizer)
