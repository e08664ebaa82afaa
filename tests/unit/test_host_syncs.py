"""Host syncs in the training step, counted (mm_moe/utils/host_syncs.py): the ops that make the
host wait for the GPU on CUDA, recognised by name so that CPU tests hold the GPU budget.

Budget (issue 28, item 3): at most one per forward for expert choice, token choice on the
grouped-GEMM path, MoT and mixture-of-depths (the modality groups' sizes, once per forward in
ForwardContext's TokenIndex), none per layer; the routing statistics fetched in one copy."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mm_moe.model.config import ModelConfig
from mm_moe.model.mod import MoDConfig
from mm_moe.model.moe.config import MoEConfig
from mm_moe.trainer.step import _mean_stats, _Sums
from mm_moe.utils.host_syncs import HostSyncCounter

BASE = ModelConfig(
    vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64
)
MOMA_EC = MoEConfig(experts_per_modality={"text": 2, "image": 2}, health_stats=True)
MOMA_TC = MoEConfig(
    experts_per_modality={"text": 2, "image": 2},
    router="token_choice",
    score="softmax",
    capacity_factor=0.0,
    load_balance_coef=0.01,
    router_z_coef=0.001,
    gemm="grouped_mm",  # the GPU path (it also runs on CPU): no counts read by the host
    health_stats=True,
)
MOD = MoDConfig(layers=[1], capacity=0.5)
# name: (model, moe, the most syncs one forward + backward may make)
PRESETS = {
    "moma_ec": (BASE, MOMA_EC, 1),
    "moma_tc": (BASE, MOMA_TC, 1),
    "mixed_ec": (BASE, MoEConfig(experts_per_modality={"mixed": 4}), 1),
    "mot": (replace(BASE, untie=["ffn", "attention", "norms"]), None, 1),
    "mod": (replace(BASE, mod=MOD), None, 1),
    # A MoD block's selected tokens form new modality groups: their sizes are one more sync
    # per MoD layer (the one MoE layer inside it), none per other layer.
    "moma_ec_mod": (replace(BASE, mod=MOD), MOMA_EC, 2),
}


def _model(name: str, collect_stats: bool = True):
    cfg, moe, _ = PRESETS[name]
    torch.manual_seed(0)
    model = cfg.build(moe).train()
    model.collect_stats = collect_stats
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (2, 20), generator=g)
    modality = (torch.rand(2, 20, generator=g) < 0.5).long()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -4:] = False  # some padding
    return ids, modality, mask


def _train_step(model, batch=None):
    """Forward and backward as a training step makes them (losses and aux losses)."""
    ids, modality, mask = batch or _batch()
    out = model(ids, modality, token_mask=mask)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    for value in [*out.aux_losses.values(), *out.aux_router_losses.values()]:
        loss = loss + value
    loss.backward()
    return out


def _fetch(stats):
    sums = _Sums(torch.device("cpu"))
    for name, value in stats.items():
        sums.add_stat(name, value)
    return _mean_stats(sums.stats, 1, torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_training_step_host_syncs_within_budget(name):
    model = _model(name)
    batch = _batch()
    _train_step(model, batch)  # warm-up (first-call caches)
    with HostSyncCounter() as step:
        out = _train_step(model, batch)
    assert step.total <= PRESETS[name][2], dict(step.by_op)
    with HostSyncCounter() as fetch:
        logged = _fetch(out.stats)
    if out.stats:
        assert fetch.total == 1, dict(fetch.by_op)  # every statistic in one copy
    if name.startswith("moma"):
        assert any(k.endswith("/jaccard") for k in logged)  # health statistics were on


@pytest.mark.parametrize("name", ["moma_ec", "moma_tc", "moma_ec_mod"])
def test_unlogged_steps_compute_no_routing_statistics(name):
    out = _train_step(_model(name, collect_stats=False))
    # Only the pair and token counts that FLOPs use, which the host knows already.
    assert out.stats and all(k.endswith(("/pairs", "/tokens")) for k in out.stats)
    with HostSyncCounter() as fetch:
        _fetch(out.stats)
    assert fetch.total == 1  # the host-side list itself: nothing on a device


def test_eval_forwards_skip_statistics_unless_asked():
    model = _model("moma_ec", collect_stats=None).eval()
    ids, modality, _ = _batch()
    with torch.no_grad():
        assert not any(k.endswith("/load") for k in model(ids, modality).stats)
        model.collect_stats = True
        assert any(k.endswith("/load") for k in model(ids, modality).stats)


def test_the_trainer_turns_statistics_on_for_logged_steps_only():
    from mm_moe.trainer.hooks import HealthStatsHook

    model = _model("moma_ec")
    cfg = SimpleNamespace(trainer=SimpleNamespace(log_interval=3, max_steps=7))
    training = SimpleNamespace(cfg=cfg, engine=SimpleNamespace(module=model), start_step=0)
    trainer = SimpleNamespace(training=training)
    hook = HealthStatsHook()
    hook.before_fit(trainer)
    computed = []
    for step in range(1, 8):
        computed.append(any(k.endswith("/load") for k in _train_step(model).stats))
        hook.after_step(trainer, step, {})
    assert computed == [False, False, True, False, False, True, True]  # 3, 6 and the last


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6)
    with HostSyncCounter() as c:
        x.sum().item()
        x.nonzero()
        x[x > 2]
        torch.bincount(x, minlength=8)  # reads the max on CUDA even with minlength
        x.repeat_interleave(x)
        x.tolist()
        x.new_tensor([1, 2])
        torch.unique(x)
        x.repeat_interleave(x, output_size=15)  # not a sync
        x.new_zeros(8).scatter_add_(0, x, torch.ones_like(x))  # not a sync
    assert dict(c.by_op) == {
        "item": 1,
        "nonzero": 1,
        "bool_index": 1,
        "bincount": 1,
        "repeat_interleave": 1,
        "tolist": 1,
        "host_data": 1,
        "unique": 1,
    }
