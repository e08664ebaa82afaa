"""The warmup-cosine schedule and AdamW parameter groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mm_moe.trainer.config import OptimConfig


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    f = [cfg.lr_factor(s, max_steps=14) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0
    assert math.isclose(f[9], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(f[14], 0.1) and math.isclose(f[15], 0.1)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_schedule_drives_optimizer_lr():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=0.5, warmup_steps=2, min_lr_ratio=0.0)
    opt = cfg.build(model)
    sched = cfg.build_schedule(opt, max_steps=4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.25])


def test_no_weight_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    groups = OptimConfig(weight_decay=0.1).build(model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"])


def test_fused_adamw_takes_the_loops_steps():
    """optim.fused (torch's fused kernel, the default) and the per-tensor loop take the same
    steps, weight decay and the norms' group included, up to rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    twin = copy.deepcopy(model)
    fused = OptimConfig(lr=1e-2, weight_decay=0.1).build(model)
    loop = OptimConfig(lr=1e-2, weight_decay=0.1, fused=False).build(twin)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    start = torch.nn.Linear(8, 16).weight
    assert (model[0].weight - start).abs().max() > 1e-3  # the steps moved the weights
