"""Balancing and stability losses on hand-computed cases, and aux-loss-free bias updates."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mm_moe.model.moe import losses
from mm_moe.model.moe.balance import update_expert_biases
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer


def test_load_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    chosen = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    # f = [3/4, 1/4], P = [0.6, 0.4]: E * sum f*P = 2 * (0.45 + 0.1) = 1.1
    assert losses.load_balance_loss(probs, chosen).item() == pytest.approx(1.1)
    uniform = torch.full((4, 2), 0.5)
    balanced = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=torch.bool)
    assert losses.load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert losses.router_z_loss(logits).item() == pytest.approx(want)


def test_entropies_hand_computed():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.local_entropy(probs).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.global_entropy(probs).item() == pytest.approx(math.log(2))
    uniform = torch.full((3, 4), 0.25)
    assert losses.local_entropy(uniform).item() == pytest.approx(math.log(4))


def test_sigmoid_routing_probs_are_normalised():
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    probs = losses.routing_probs(logits, "sigmoid")
    torch.testing.assert_close(probs, torch.full((1, 3), 1 / 3))


def test_losses_are_returned_with_the_output():
    from tests.unit.test_moe_layer import MOMA_TC, _ctx, _inputs, _layer

    cfg = replace(
        MOMA_TC,
        load_balance_coef=0.5,
        router_z_coef=0.1,
        entropy_local_coef=0.2,
        entropy_global_coef=0.3,
    )
    layer = _layer(cfg)
    x, modality, valid = _inputs()
    ctx = _ctx(modality, valid)
    layer(x, ctx)
    assert set(ctx.aux_losses) == {
        "moe/load_balance",
        "moe/router_z",
        "moe/entropy_local",
        "moe/entropy_global",
    }
    # Recompute the load-balance term of both groups by hand.
    want = 0.0
    for name, m in (("text", 0), ("image", 1)):
        rows = x[(modality == m) & valid]
        logits = rows @ layer.routers[name].weight.t()
        probs = torch.softmax(logits, -1)
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.argmax(1, True), True)
        want += 0.5 * losses.load_balance_loss(probs, chosen).item()
    assert ctx.aux_losses["moe/load_balance"].item() == pytest.approx(want, rel=1e-5)
    layer.eval()
    ctx_eval = _ctx(modality, valid)
    layer(x, ctx_eval)
    assert ctx_eval.aux_losses == {}  # no training losses in eval


def test_bias_balancing_moves_towards_equal_load():
    cfg = MoEConfig(
        experts_per_modality={"mixed": 4},
        router="token_choice",
        score="sigmoid",
        top_k=1,
        capacity_factor=0.0,
        bias_update_rate=0.1,
    )
    layer = MoELayer(cfg, 8, 16, 0)
    layer.load_accum.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    seen = []
    update_expert_biases(torch.nn.Sequential(layer), lambda t: seen.append(t) or t * 2)
    assert len(seen) == 1  # loads are summed over ranks before the update
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert not layer.load_accum.any()


@pytest.mark.parametrize("key", ["bias_update_rate", "load_balance_coef"])
def test_token_choice_balancing_with_expert_choice_is_refused(key):
    from mm_moe.config import ConfigError, TrainConfig, from_dict

    moe = {"experts_per_modality": {"text": 2, "image": 2}, "router": "expert_choice", key: 0.01}
    with pytest.raises(ConfigError, match=rf"moe.{key}=0.01 has no effect with .*expert_choice"):
        from_dict(TrainConfig, {"moe": moe})
    from_dict(TrainConfig, {"moe": {**moe, "router": "token_choice"}})  # fine there
