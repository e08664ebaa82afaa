"""MoT, MoD and MoE inside the decoder: exactness, causality at inference, counting."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from mm_moe.model.config import MoDConfig, ModelConfig
from mm_moe.model.moe.config import MoEConfig

BASE = ModelConfig(
    vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64
)
MOMA_EC = MoEConfig(experts_per_modality={"text": 2, "image": 2})
MIXED_TC = MoEConfig(
    experts_per_modality={"mixed": 4},
    router="token_choice",
    top_k=2,
    score="softmax",
    capacity_factor=0.0,
)
VARIANTS = {
    "dense": (BASE, None),
    "moma_ec": (BASE, MOMA_EC),
    "mixed_tc": (BASE, MIXED_TC),
    "moma_ec_granular_shared_some_layers": (
        BASE,
        replace(MOMA_EC, granularity=2, shared_experts=1, layers=[0, 2]),
    ),
    "mot": (replace(BASE, untie=["ffn", "attention", "norms"]), None),
    "mot_moma": (replace(BASE, untie=["attention", "norms"]), MOMA_EC),
    "mod": (replace(BASE, mod=MoDConfig(layers=[1], capacity=0.5)), None),
    "moma_mod": (replace(BASE, mod=MoDConfig(layers=[0, 2], capacity=0.25)), MOMA_EC),
    "post_norm_moma": (replace(BASE, norm_placement="post", tie_embeddings=True), MOMA_EC),
}


def _batch(seed=0, B=2, S=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (B, S), generator=g)
    modality = (torch.rand(B, S, generator=g) < 0.5).long()
    return ids, modality


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_num_params_total_matches_built_model(name):
    cfg, moe = VARIANTS[name]
    model = cfg.build(moe)
    assert cfg.num_params(moe)["total"] == sum(p.numel() for p in model.parameters())


def test_active_params_and_flops_of_moma_equal_dense_at_capacity_one():
    dense = BASE.num_params()
    moma = BASE.num_params(MOMA_EC)
    routers_and_aux = moma["active"]["text"] - dense["active"]["text"]
    # Capacity factor 1: one expert of the dense FFN's size per token, plus router costs.
    hid = MOMA_EC.aux_router_hidden
    per_layer = 32 * 2 + (32 * hid + hid + hid * 2 + 2)
    assert routers_and_aux == BASE.n_layers * per_layer
    assert moma["total"] > 2 * dense["total"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_eval_output_at_t_ignores_tokens_after_t(name):
    cfg, moe = VARIANTS[name]
    torch.manual_seed(0)
    model = cfg.build(moe).eval()
    ids, modality = _batch()
    changed, changed_mod = ids.clone(), modality.clone()
    changed[:, 11:] = torch.randint(0, 61, (2, 9))
    changed_mod[:, 11:] = 1 - changed_mod[:, 11:]
    with torch.no_grad():
        a = model(ids, modality).logits
        b = model(changed, changed_mod).logits
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_trains(name):
    """Gradients reach (almost) every parameter, and a few AdamW steps on one batch lower the
    loss well below where it started."""
    cfg, moe = VARIANTS[name]
    torch.manual_seed(0)
    model = cfg.build(moe).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, modality = _batch()
    losses = []
    for step in range(6):
        out = model(ids[:, :-1], modality[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        aux = {**out.aux_losses, **out.aux_router_losses}
        opt.zero_grad()
        (loss + sum(aux.values(), torch.zeros(()))).backward()
        if step == 0:
            used = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()]
            assert len(used) > 0.8 * len(list(model.parameters()))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_mot_with_identical_copies_equals_dense():
    torch.manual_seed(0)
    dense = BASE.build().eval()
    mot_cfg = replace(BASE, untie=["ffn", "attention", "norms"])
    mot = mot_cfg.build().eval()
    dense_state = dense.state_dict()
    new_state = {}
    for key, value in mot.state_dict().items():
        if ".ffn.experts." in key:  # layers.i.ffn.experts.m.w_x.weight <- layers.i.ffn.w_x.weight
            prefix, rest = key.split(".ffn.experts.")
            src = dense_state[f"{prefix}.ffn.{rest.split('.', 1)[1]}"]
        elif key in dense_state:
            src = dense_state[key]
        else:
            raise AssertionError(key)
        new_state[key] = src.expand_as(value).clone()
    mot.load_state_dict(new_state)
    ids, modality = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            mot(ids, modality).logits, dense(ids).logits, atol=1e-6, rtol=1e-6
        )


def test_mod_processes_capacity_fraction_and_skips_padding():
    cfg = replace(BASE, mod=MoDConfig(layers=[1], capacity=0.25))
    torch.manual_seed(0)
    model = cfg.build().train()
    ids, modality = _batch(S=20)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :8] = False  # padding never takes a slot
    out = model(ids, modality, token_mask=mask)
    # 25% of 20 positions = 5 slots per row, among 12 valid tokens.
    assert out.stats["mod/l1/selected"].item() == pytest.approx(5 / 12)


def test_moe_stats_equal_a_naive_recount():
    """Load per expert, unprocessed fraction and auxiliary-router accuracy of expert choice,
    per layer and group, recounted from each layer's own input: a per-expert top-C loop."""
    torch.manual_seed(0)
    model = BASE.build(MOMA_EC).train()
    ids, modality = _batch()
    inputs = {}
    hooks = [
        block.ffn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, block in enumerate(model.layers)
    ]
    stats = model(ids, modality).stats
    for hook in hooks:
        hook.remove()
    for layer, block in enumerate(model.layers):
        x_Td = inputs[layer].detach().reshape(-1, BASE.d_model).float()
        for m, group in enumerate(("text", "image")):
            x_group = x_Td[modality.reshape(-1) == m]
            T = len(x_group)
            scores = torch.sigmoid(x_group @ block.ffn.routers[group].weight.float().T)
            chosen = torch.zeros(T, 2, dtype=torch.bool)
            for e in range(2):  # capacity factor 1, top 1, 2 experts: each takes T // 2
                for t in sorted(range(T), key=lambda t: -float(scores[t, e]))[: T // 2]:
                    chosen[t, e] = True
            with torch.no_grad():
                predicted = block.ffn.aux_routers[group](x_group) > 0
            at = f"moe/l{layer}/{group}"
            torch.testing.assert_close(stats[f"{at}/load"], chosen.sum(0) / chosen.sum())
            assert float(stats[f"{at}/dropped"]) == pytest.approx((~chosen.any(1)).sum() / T)
            assert float(stats[f"{at}/aux_router_acc"]) == pytest.approx(
                float((predicted == chosen).float().mean())
            )
            assert float(stats[f"{at}/aux_router_baseline"]) == pytest.approx(
                1 - float(chosen.float().mean())
            )


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(experts_per_modality={"text": 2}), "moe.experts_per_modality"),
        (dict(experts_per_modality={"text": 2, "image": 0}), "moe.experts_per_modality"),
        (dict(experts_per_modality={"mixed": 2}, router="token_choice", top_k=3), "moe.top_k"),
        (dict(capacity_factor=0.0), "moe.capacity_factor"),
        # expert choice: each expert would take more than every token of its group
        (dict(top_k=3), "moe.capacity_factor=1.0 x moe.top_k=3 exceeds the 2 experts"),
        (dict(capacity_factor=2.5), "moe.capacity_factor=2.5 x moe.top_k=1 exceeds"),
        (dict(layers=[-1]), "moe.layers=[-1] must be layer indices >= 0"),
        (dict(layers=[]), "moe.layers=[] makes no layer MoE"),
        (dict(layers=[1, 1, 3]), "moe.layers=[1, 1, 3] lists layer(s) [1] more than once"),
        (dict(granularity=0), "moe.granularity=0 must be >= 1"),
        (dict(shared_experts=-1), "moe.shared_experts=-1 must be >= 0"),
        (dict(router_noise=-1.0), "moe.router_noise=-1.0 must be >= 0"),
    ],
)
def test_bad_moe_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        MoEConfig(**{"experts_per_modality": {"mixed": 2}, **bad})


def test_mixture_of_depths_layers_listed_twice_are_refused():
    from mm_moe.model.config import MoDConfig

    with pytest.raises(
        ValueError, match=re.escape("model.mod.layers=[0, 2, 2] lists layer(s) [2]")
    ):
        MoDConfig(layers=[0, 2, 2])


def test_granularity_must_divide_ffn():
    with pytest.raises(ValueError, match="moe.granularity"):
        BASE.build(replace(MOMA_EC, granularity=3))


def test_initialization_is_the_same_for_dense_mot_and_experts():
    """Norm weights start at one (per-modality copies too), and every residual branch's output
    projection (dense, per-modality, stacked experts) has the depth-scaled std."""
    from mm_moe.model.config import ModelConfig
    from mm_moe.model.modality_ops import ModalityNorm
    from mm_moe.model.moe.config import MoEConfig
    from mm_moe.model.norms import RMSNorm

    base = dict(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2)
    moe = MoEConfig(experts_per_modality={"text": 4, "image": 4})
    variants = {
        "mot": ModelConfig(**base, untie=["ffn", "attention", "norms"]).build(MoEConfig()),
        "moma": ModelConfig(**base).build(moe),
        "dense": ModelConfig(**base).build(MoEConfig()),
    }
    want = 0.02 / (2 * base["n_layers"]) ** 0.5
    for name, model in variants.items():
        for module in model.modules():
            if isinstance(module, (RMSNorm, ModalityNorm)):
                assert torch.equal(module.weight, torch.ones_like(module.weight)), name
        outs = [
            p
            for n, p in model.named_parameters()
            if n.endswith(("w_o.weight", "w_down.weight", "experts.w_down"))
        ]
        assert outs, name
        for p in outs:
            assert abs(p.std().item() - want) < 0.15 * want, (name, p.shape, p.std().item())


def test_mot_unties_the_final_norm_and_older_checkpoints_load(tmp_path):
    """MoT unties every norm but the embeddings': the final norm too (`norm.weight` is
    [modalities, d]); a checkpoint that stored it shared ([d]) still loads, as copies."""
    from mm_moe.api import load_pretrained
    from mm_moe.checkpoint import layout
    from mm_moe.config import TrainConfig, to_dict
    from mm_moe.data.config import DataConfig
    from mm_moe.model.modality_ops import ModalityNorm

    cfg = replace(BASE, untie=["attention", "norms"])
    torch.manual_seed(0)
    model = cfg.build().eval()
    assert isinstance(model.norm, ModalityNorm) and model.norm.weight.shape == (2, 32)
    ids, modality = _batch()
    with torch.no_grad():
        model.norm.weight[1].mul_(3.0)  # the image row alone changes image positions
        before = model(ids, modality).logits
        model.norm.weight[1].div_(3.0)
        after = model(ids, modality).logits
    image = modality.bool()
    assert not torch.allclose(before[image], after[image])
    torch.testing.assert_close(before[~image], after[~image])

    # an older checkpoint: the same weights, final norm stored shared as [d]
    import yaml

    state = {k: v.clone() for k, v in model.state_dict().items() if "rope" not in k}
    state["norm.weight"] = state["norm.weight"][0].clone()
    step = tmp_path / layout.step_dir_name(1)
    step.mkdir()
    torch.save(state, step / "model.pt")
    train_cfg = TrainConfig(model=cfg, data=DataConfig(seq_len=32))
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(train_cfg)))
    (step / layout.META).write_text('{"format_version": 2, "step": 1, "weights_only": true}')
    loaded = load_pretrained(step)
    assert torch.equal(loaded.norm.weight, model.norm.weight)  # both rows from the [d] copy
    torch.testing.assert_close(loaded(ids, modality).logits, after)


def test_norm_weights_get_no_weight_decay_per_modality_copies_included():
    from mm_moe.model.modality_ops import ModalityNorm
    from mm_moe.model.norms import RMSNorm
    from mm_moe.trainer.config import OptimConfig

    model = replace(BASE, untie=["ffn", "attention", "norms"]).build()
    opt = OptimConfig(weight_decay=0.1).build(model)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, ModalityNorm))]
    assert norms and not any(id(m.weight) in decayed for m in norms)
    assert id(model.lm_head.weight) in decayed


def test_a_checkpoint_saved_with_trainer_peak_flops_still_loads(tmp_path):
    """trainer.peak_flops (FLOP/s) became trainer.peak_tflops: checkpoints saved before the
    rename load with the value carried over, where the schema alone refuses the old key."""
    import yaml

    from mm_moe.checkpoint import layout
    from mm_moe.config import ConfigError, TrainConfig, from_dict, to_dict
    from mm_moe.config.legacy import upgrade_saved_config
    from mm_moe.data.config import DataConfig
    from mm_moe.eval.pretrained import _train_config

    saved = to_dict(TrainConfig(model=BASE, data=DataConfig(seq_len=32)))
    del saved["trainer"]["peak_tflops"]
    saved["trainer"]["peak_flops"] = 989e12
    with pytest.raises(ConfigError, match="peak_flops"):
        from_dict(TrainConfig, saved)
    assert "peak_flops" in saved["trainer"]  # the upgrade copies, the caller's dict stays
    assert upgrade_saved_config(saved)["trainer"]["peak_tflops"] == pytest.approx(989.0)
    step = tmp_path / layout.step_dir_name(1)
    step.mkdir()
    (step / "config.yaml").write_text(yaml.safe_dump(saved))
    (step / layout.META).write_text('{"format_version": 2, "step": 1, "weights_only": true}')
    cfg = _train_config(step, None)
    assert cfg.trainer.peak_tflops == pytest.approx(989.0) and cfg.model == BASE
