"""Routing health: the statistics on planted routers, the degeneracy warning, and that each
remedy changes what it claims to."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mm_moe.model.context import ForwardContext
from mm_moe.model.moe import router
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.health import routing_health
from mm_moe.model.moe.layer import MoELayer
from mm_moe.trainer.config import OptimConfig, RoutingWarningConfig
from mm_moe.trainer.hooks import RouterNoiseHook, RoutingHealthHook, raw_sigmoid_gates

D = 32
MOMA = MoEConfig(experts_per_modality={"text": 4, "image": 4})
MAIN = SimpleNamespace(is_main=True)


def _forward(layer: MoELayer, seed: int = 0, T: int = 256) -> dict[str, float]:
    """The layer's stats on T random tokens, half of each modality (one row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, D, generator=g)
    modality = (torch.arange(T) % 2).view(1, T)
    ctx = ForwardContext.for_layer(modality)
    layer(x, ctx)
    return {k: v.item() for k, v in ctx.stats.items() if v.dim() == 0}


def _layer(cfg: MoEConfig = MOMA, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(cfg, D, 64, layer_index=2).train()


def test_statistics_equal_a_count_by_hand():
    g = torch.Generator().manual_seed(1)
    scores_TE = torch.rand(10, 3, generator=g)
    routing = router.expert_choice(scores_TE, scores_TE, capacity=3)
    weight_Ed = torch.randn(3, D, generator=g)
    got = routing_health(torch.logit(scores_TE), routing, weight_Ed)
    chosen = routing.chosen_TE
    per_token = chosen.sum(1)
    assert got["taken_0"] == pytest.approx((per_token == 0).float().mean().item())
    assert got["taken_1"] == pytest.approx((per_token == 1).float().mean().item())
    assert got["taken_2plus"] == pytest.approx((per_token >= 2).float().mean().item())
    assert got["gate_mean"] == pytest.approx(scores_TE[chosen].mean().item())
    sums = (scores_TE * chosen).sum(1)[per_token > 0]
    assert got["gate_sum"] == pytest.approx(sums.mean().item())
    jac, cos = [], []
    for a in range(3):
        for b in range(3):
            if a != b:
                both = (chosen[:, a] & chosen[:, b]).sum()
                either = (chosen[:, a] | chosen[:, b]).sum()
                jac.append((both / either).item())
                cos.append(F.cosine_similarity(weight_Ed[a], weight_Ed[b], dim=0).item())
    assert got["jaccard"] == pytest.approx(sum(jac) / len(jac))
    assert got["router_cosine"] == pytest.approx(sum(cos) / len(cos), abs=1e-6)


def _collapse(layer: MoELayer, group: str) -> None:
    """Plant a collapsed router: every expert of `group` with the same row."""
    with torch.no_grad():
        w = layer.routers[group].weight
        w.copy_(w[:1].expand_as(w) - 1.0 / D**0.5)  # identical rows, negative logits


def test_a_collapsed_router_shows_and_the_warning_names_it(caplog):
    layer = _layer()
    _collapse(layer, "image")
    stats = _forward(layer)
    image, text = "moe/l2/image", "moe/l2/text"
    assert stats[f"{image}/router_cosine"] == pytest.approx(1.0)
    assert stats[f"{image}/jaccard"] == pytest.approx(1.0)  # every expert took the same tokens
    assert stats[f"{image}/taken_0"] == pytest.approx(0.75)  # capacity T/4 each, all alike
    assert stats[f"{image}/taken_2plus"] == pytest.approx(0.25)
    assert stats[f"{text}/router_cosine"] < 0.5 and stats[f"{text}/jaccard"] < 0.5

    hook = RoutingHealthHook(RoutingWarningConfig(intervals=3), sigmoid_gates=True)
    trainer = SimpleNamespace(training=SimpleNamespace(cfg=_cfg(log_interval=10), dist=MAIN))
    with caplog.at_level(logging.WARNING, logger="mm_moe"):
        for step in range(1, 31):
            hook.after_step(trainer, step, dict(stats))
            if step < 30:
                assert not caplog.records, step  # only the third logged step in a row warns
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "layer 2, group image" in message and "75% of its tokens" in message
    assert "moe.expert_choice_gate=normalized" in message


def test_without_health_stats_the_warning_reads_the_unprocessed_share(caplog):
    """moe.health_stats=false: no taken_0 or gate_mean, and the warning still fires from the
    `dropped` share (for expert choice: tokens no expert took)."""
    layer = _layer(replace(MOMA, health_stats=False))
    _collapse(layer, "image")
    stats = _forward(layer)
    assert "moe/l2/image/taken_0" not in stats
    assert stats["moe/l2/image/dropped"] == pytest.approx(0.75)
    _log_steps(caplog, stats, steps=3, intervals=2)
    assert len(caplog.records) == 1
    assert "layer 2, group image" in caplog.records[0].getMessage()


def test_the_low_gate_rule_only_where_gates_are_raw_sigmoid_scores():
    """Renormalized token choice and normalized expert choice average 1/k by design; softmax
    gates shrink with the experts: neither is a silenced expert."""
    tc = MoEConfig(experts_per_modality={"text": 4, "image": 4}, router="token_choice")
    assert raw_sigmoid_gates(MOMA)
    assert not raw_sigmoid_gates(replace(MOMA, expert_choice_gate="normalized"))
    assert not raw_sigmoid_gates(replace(MOMA, score="softmax"))
    assert not raw_sigmoid_gates(replace(tc, top_k=3))  # renormalized: gates average 1/3
    assert raw_sigmoid_gates(replace(tc, top_k=3, renormalize=False))
    layer = _layer(replace(tc, top_k=3))
    stats = _forward(layer)
    assert stats["moe/l2/text/gate_mean"] == pytest.approx(1 / 3)  # 1/k, below gate_mean=0.4
    hook = RoutingHealthHook(RoutingWarningConfig(intervals=1, gate_mean=0.4), sigmoid_gates=False)
    trainer = SimpleNamespace(training=SimpleNamespace(cfg=_cfg(log_interval=1), dist=MAIN))
    hook.after_step(trainer, 1, dict(stats))
    assert not hook.warned


def test_a_healthy_router_does_not_warn(caplog):
    layer = _layer(replace(MOMA, router_init="orthogonal"))
    layer.init_routers(0.02)
    stats = _forward(layer)
    assert abs(stats["moe/l2/image/router_cosine"]) < 1e-5
    _log_steps(caplog, stats, steps=5, intervals=2)
    assert not caplog.records


def test_a_group_without_tokens_in_a_step_is_not_called_degenerate(caplog):
    """A step where a group had no tokens at all logs its per-token figures as NaN (null in
    metrics.jsonl): no evidence either way, never a warning."""
    stats = _forward(_layer())
    empty = {
        k: float("nan") if "/image/" in k and "router_cosine" not in k else v
        for k, v in stats.items()
    }
    _log_steps(caplog, empty, steps=3, intervals=1)
    assert not caplog.records


def _log_steps(caplog, stats: dict, steps: int, intervals: int) -> None:
    """The warning hook on `steps` logged steps in a row, each with these statistics."""
    hook = RoutingHealthHook(RoutingWarningConfig(intervals=intervals), sigmoid_gates=True)
    trainer = SimpleNamespace(training=SimpleNamespace(cfg=_cfg(log_interval=1), dist=MAIN))
    with caplog.at_level(logging.WARNING, logger="mm_moe"):
        for step in range(1, steps + 1):
            hook.after_step(trainer, step, dict(stats))


def _cfg(log_interval=1, noise=1.0, anneal=10):
    return SimpleNamespace(
        trainer=SimpleNamespace(log_interval=log_interval),
        moe=SimpleNamespace(router_noise=noise, router_noise_anneal_steps=anneal),
    )


# ---- remedies ----
def test_orthogonal_init_gives_orthogonal_rows_of_the_normal_rows_norm():
    from mm_moe.model.config import ModelConfig

    moe = replace(MOMA, router_init="orthogonal")
    model = ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, n_kv_heads=1).build(moe)
    for layer in (b.ffn for b in model.layers):
        for w in layer.routers.values():
            gram = w.weight @ w.weight.t()
            norm2 = (model.cfg.init_std**2) * D
            assert torch.allclose(gram, norm2 * torch.eye(4), atol=1e-6)


def test_normalized_expert_choice_gates_sum_to_one_per_token():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 4, generator=g)
    raw = router.expert_choice(scores, scores, 5)
    norm = router.expert_choice(scores, scores, 5, normalize=True)
    assert torch.equal(raw.token_idx_N, norm.token_idx_N)  # the same selection
    sums = torch.zeros(12).index_add(0, norm.token_idx_N, norm.gate_N)
    processed = raw.chosen_TE.any(1)
    assert torch.allclose(sums[processed], torch.ones(int(processed.sum())))
    assert not torch.allclose(raw.gate_N, norm.gate_N)


def test_cosine_router_ignores_the_token_norm():
    layer = _layer(replace(MOMA, router_logits="cosine"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, D, generator=g)
    modality = (torch.arange(64) % 2).view(1, 64)
    scale = torch.rand(1, 64, 1, generator=g) * 10 + 0.1  # per-token norms
    outs = []
    for inp in (x, x * scale):
        ctx = ForwardContext.for_layer(modality)
        layer(inp, ctx)
        outs.append({k: v for k, v in ctx.stats.items() if k.endswith(("/load", "/taken_0"))})
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k]), k
    linear = _layer(MOMA)
    loads = []
    for inp in (x, x * scale):
        ctx = ForwardContext.for_layer(modality)
        linear(inp, ctx)
        loads.append(ctx.stats["moe/l2/image/gate_mean"])
    assert not torch.allclose(loads[0], loads[1])  # a linear router's gates follow the norm


def test_router_lr_scale_puts_routers_in_their_own_group():
    from mm_moe.model.config import ModelConfig

    model = ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, n_kv_heads=1).build(MOMA)
    cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    one = cfg.build(model)
    scaled = cfg.build(model, router_lr_scale=0.1)
    routers = {id(p) for b in model.layers for p in b.ffn.routers.parameters()}
    assert len(scaled.param_groups) == len(one.param_groups) + 1
    for group in scaled.param_groups:
        in_group = {id(p) for p in group["params"]}
        assert (in_group == routers) == (group["lr"] == pytest.approx(1e-3))
    # The schedule keeps the ratio.
    schedule = cfg.build_schedule(scaled, max_steps=10)
    scaled.step()  # no gradients: no update
    schedule.step()
    lrs = sorted(g["lr"] for g in scaled.param_groups)
    assert lrs[0] == pytest.approx(0.1 * lrs[-1])


def test_router_noise_anneals_linearly_to_zero():
    layer = _layer(replace(MOMA, router_noise=1.0))
    model = torch.nn.ModuleList([layer])
    trainer = SimpleNamespace(
        training=SimpleNamespace(
            cfg=_cfg(noise=2.0, anneal=4), engine=SimpleNamespace(module=model), start_step=0
        )
    )
    hook = RouterNoiseHook()
    hook.before_fit(trainer)
    logged = []
    for step in range(1, 7):
        record = {}
        hook.after_step(trainer, step, record)
        logged.append(record["moe/router_noise"])
    assert logged == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert layer.noise_scale == 0.0
    # Without noise left, training selection is the noise-free one.
    noisy_free = _forward(layer, seed=3)
    layer.noise_scale = 1.0
    noisy = _forward(layer, seed=3)
    clean = _forward(_layer(MOMA), seed=3)  # the same weights, no noise configured
    assert noisy_free == clean and noisy != clean


def test_statistics_are_computed_on_logged_steps_only(tmp_path):
    """Trainer.fit as built by build_training (its default hooks): the routing statistics
    (expert loads) and the health statistics (moe.health_stats) are in the forwards of the
    logged steps only, every trainer.log_interval and the last."""
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.trainer.build import build_training
    from mm_moe.trainer.trainer import Trainer

    cfg = from_dict(
        TrainConfig,
        {
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
            "moe": {"experts_per_modality": {"text": 2, "image": 2}, "health_stats": True},
            "data": {"seq_len": 16},
            "trainer": {
                "global_batch_size": 2,
                "max_steps": 7,
                "log_interval": 3,
                "run_dir": str(tmp_path),
            },
            "checkpoint": {"interval": 0},
            "eval": {"interval": 0},
            "logging": {"wandb": {"mode": "disabled"}},
        },
    )
    training = build_training(cfg)
    computed = []  # per training forward: (loads, health statistics)

    def record(module, args, kwargs, out):
        if module.training:
            keys = out.stats.keys()
            loads = any(k.endswith("/load") for k in keys)
            computed.append((loads, any(k.endswith("/jaccard") for k in keys)))

    training.engine.module.register_forward_hook(record, with_kwargs=True)
    history = Trainer(training).fit()
    assert len(history) == len(computed) == 7  # one forward per step
    assert computed == [(s in (3, 6, 7),) * 2 for s in range(1, 8)], computed
    # The logged steps carry the training loss of every step since the previous logged one,
    # weighted by loss tokens (steps 1-3, 4-6, 7).
    for last, first in ((3, 1), (6, 4), (7, 7)):
        rows = history[first - 1 : last]
        row = history[last - 1]
        assert row["steps_interval"] == len(rows)
        for loss, tokens in (("loss", "tokens_loss"), ("loss_text", "tokens_text")):
            want = sum(r[loss] * r[tokens] for r in rows) / sum(r[tokens] for r in rows)
            assert row[f"{loss}_interval"] == pytest.approx(want, rel=1e-12), (last, loss)
    assert "loss_interval" not in history[3]
