"""The MoE layer against a naive per-token reference, forward and gradients."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mm_moe.modality import IMAGE, TEXT
from mm_moe.model.context import ForwardContext
from mm_moe.model.moe import batched_choice, batched_tokens
from mm_moe.model.moe import router as router_mod
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer

D, HIDDEN = 16, 32


def _ctx(modality_BS, valid_BS=None):
    return ForwardContext.for_layer(modality_BS, valid_BS)


def _expert(layer, e, x_d):
    ex = layer.experts
    gate, up = (x_d @ ex.w_gate_up[e]).chunk(2)
    return (F.silu(gate) * up) @ ex.w_down[e]


def _naive(layer: MoELayer, x_BSd, modality_BS, valid_BS, training: bool):
    """Selection and combination with Python loops over experts and tokens."""
    cfg = layer.cfg
    B, S, d = x_BSd.shape
    x_Td, mod_T, valid_T = x_BSd.reshape(-1, d), modality_BS.reshape(-1), valid_BS.reshape(-1)
    out = [torch.zeros(d) for _ in range(B * S)]
    for name, modalities, E in layer.group_specs:
        tokens = [t for t in range(B * S) if valid_T[t] and int(mod_T[t]) in modalities]
        off = layer.offsets[name]
        w = layer.routers[name].weight
        if cfg.router_logits == "cosine":
            logits = {
                t: cfg.cosine_router_scale * F.cosine_similarity(w, x_Td[t][None], dim=1)
                for t in tokens
            }
        else:
            logits = {t: (w @ x_Td[t]).float() for t in tokens}
        scores = {
            t: torch.sigmoid(v) if cfg.score == "sigmoid" else torch.softmax(v, 0)
            for t, v in logits.items()
        }
        pairs = []  # (token, expert, gate)
        if cfg.router == "expert_choice":
            if training:
                per_expert = int(cfg.capacity_factor * cfg.k * len(tokens) / E)
                cap = min(len(tokens), max(1, per_expert))
                for e in range(E):
                    ranked = sorted(tokens, key=lambda t: -scores[t][e].item())[:cap]
                    pairs += [(t, e, scores[t][e]) for t in ranked]
                if cfg.expert_choice_gate == "normalized":
                    total = {t: sum(g for u, _, g in pairs if u == t) for t, _, _ in pairs}
                    pairs = [(t, e, g / total[t]) for t, e, g in pairs]
            else:
                aux = layer.aux_routers[name]
                for t in tokens:
                    pred = aux(x_Td[t : t + 1])[0]
                    pairs += [(t, e, scores[t][e]) for e in range(E) if pred[e] > 0]
        else:
            cap = None
            if training and cfg.capacity_factor > 0:
                cap = math.ceil(cfg.capacity_factor * cfg.k * len(tokens) / E)
            taken = [0] * E
            for t in tokens:
                top = sorted(range(E), key=lambda e: -scores[t][e].item())[: cfg.k]
                gates = [scores[t][e] for e in top]
                if cfg.renormalize and len(gates) == 1 and cfg.top1_straight_through:
                    gates = [1.0 + (g - g.detach()) for g in gates]  # 1, with the score's grad
                elif cfg.renormalize:
                    total = sum(gates)
                    gates = [g / total for g in gates]
                for e, g in zip(top, gates):
                    if cap is None or taken[e] < cap:
                        pairs.append((t, e, g))
                    taken[e] += 1
        for t, e, g in pairs:
            out[t] = out[t] + g * _expert(layer, off + e, x_Td[t])
        if name in layer.shared:
            for t in tokens:
                out[t] = out[t] + layer.shared[name](x_Td[t : t + 1])[0]
    return torch.stack(out).view(B, S, d)


# MoMa (2 text + 2 image experts) with dropless token-choice softmax top-1 routing: the base
# that tests of its losses and host syncs add their coefficients to.
MOMA_TC = MoEConfig(
    experts_per_modality={"text": 2, "image": 2},
    router="token_choice",
    score="softmax",
    capacity_factor=0.0,
)

CASES = {
    "ec_sigmoid_moma": MoEConfig(experts_per_modality={"text": 3, "image": 2}),
    "ec_normalized_cosine": MoEConfig(
        experts_per_modality={"text": 3, "image": 2},
        expert_choice_gate="normalized",
        router_logits="cosine",
        router_init="orthogonal",
    ),
    "ec_softmax_mixed": MoEConfig(
        experts_per_modality={"mixed": 4}, score="softmax", capacity_factor=1.5
    ),
    "ec_granular_shared": MoEConfig(
        experts_per_modality={"text": 2, "image": 2}, granularity=2, shared_experts=1
    ),
    "tc_softmax_top2": MoEConfig(
        experts_per_modality={"text": 4, "image": 3},
        router="token_choice",
        score="softmax",
        top_k=2,
        capacity_factor=0.0,
    ),
    "tc_sigmoid_raw_mixed": MoEConfig(
        experts_per_modality={"mixed": 5},
        router="token_choice",
        top_k=2,
        renormalize=False,
        capacity_factor=0.0,
    ),
    # Renormalized top-1: gates of 1 whose gradient is the score's (straight-through).
    "tc_top1_renormalized": MoEConfig(
        experts_per_modality={"text": 3, "image": 2},
        router="token_choice",
        score="softmax",
        capacity_factor=0.0,
    ),
    "tc_capacity": MoEConfig(
        experts_per_modality={"text": 3, "image": 3},
        router="token_choice",
        score="softmax",
        top_k=2,
        capacity_factor=0.5,
    ),
    "tc_grouped_mm": MoEConfig(
        experts_per_modality={"text": 3, "image": 2},
        router="token_choice",
        score="softmax",
        top_k=2,
        capacity_factor=0.0,
        gemm="grouped_mm",
    ),
    "ec_grouped_mm": MoEConfig(experts_per_modality={"text": 3, "image": 2}, gemm="grouped_mm"),
    "tc_padded": MoEConfig(
        experts_per_modality={"text": 3, "image": 2},
        router="token_choice",
        score="softmax",
        top_k=2,
        capacity_factor=0.0,
        gemm="padded",
    ),
    "tc_loop": MoEConfig(
        experts_per_modality={"mixed": 4},
        router="token_choice",
        score="softmax",
        top_k=2,
        capacity_factor=0.0,
        gemm="loop",
    ),
}


def _inputs(seed=0, B=2, S=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    modality = (torch.rand(B, S, generator=g) < 0.4).long()  # ~40% image
    valid = torch.rand(B, S, generator=g) > 0.15  # some padding
    return x, modality, valid


def _layer(cfg, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(cfg, D, HIDDEN, layer_index=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _assert_equals_naive(cfg: MoEConfig, training: bool, x, modality, valid):
    """Output, input gradient and parameter gradients of the layer vs the naive loop."""
    layer = _layer(cfg)
    layer.train(training)
    ref_layer = copy.deepcopy(layer)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(x1, _ctx(modality, valid))
    want = _naive(ref_layer, x2, modality, valid, training)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), n
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=n)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_layer_equals_naive_reference_forward_and_backward(name, training):
    x, modality, valid = _inputs()
    out = _assert_equals_naive(CASES[name], training, x, modality, valid)
    # Padding never reaches an expert: its output is exactly zero.
    assert not out[~valid].any()


@pytest.mark.parametrize("name", ["tc_loop", "ec_softmax_mixed", "tc_shared_mixed"])
def test_layer_without_padding_equals_naive_reference(name):
    """A group that holds every token skips the gather (and its backward the scatter)."""
    cfg = CASES.get(name) or replace(CASES["tc_loop"], shared_experts=1, granularity=2)
    x, modality, valid = _inputs(3)
    _assert_equals_naive(cfg, True, x, modality, torch.ones_like(valid))


def test_text_only_batch_gives_image_experts_no_gradient():
    cfg = CASES["ec_sigmoid_moma"]
    layer = _layer(cfg)
    x, _, _ = _inputs()
    modality = torch.full(x.shape[:2], TEXT)
    layer(x, _ctx(modality)).pow(2).sum().backward()
    img = slice(layer.offsets["image"], layer.offsets["image"] + 2)
    txt = slice(0, layer.offsets["image"])
    for w in (layer.experts.w_gate_up, layer.experts.w_down):
        assert not w.grad[img].any() and w.grad[txt].abs().sum() > 0
    assert (
        layer.routers["image"].weight.grad is None or not layer.routers["image"].weight.grad.any()
    )
    assert layer.routers["text"].weight.grad.abs().sum() > 0


def test_image_only_batch_gives_text_experts_no_gradient():
    cfg = replace(CASES["tc_softmax_top2"])
    layer = _layer(cfg)
    x, _, _ = _inputs(1)
    layer(x, _ctx(torch.full(x.shape[:2], IMAGE))).pow(2).sum().backward()
    txt = slice(0, layer.offsets["image"])
    for w in (layer.experts.w_gate_up, layer.experts.w_down):
        assert not w.grad[txt].any()


class _RecordingDispatcher:
    def __init__(self):
        self.counts = None

    def __call__(self, x_Nd, counts_E, experts):
        self.counts = counts_E.tolist()
        return experts(x_Nd, counts_E)


def test_expert_choice_capacity_counts_only_valid_tokens():
    cfg = MoEConfig(experts_per_modality={"text": 4, "image": 2}, capacity_factor=1.0)
    layer = _layer(cfg)
    layer.dispatcher = rec = _RecordingDispatcher()
    x, modality, valid = _inputs(2, B=3, S=16)
    layer(x, _ctx(modality, valid))
    n_text = int(((modality == TEXT) & valid).sum())
    n_image = int(((modality == IMAGE) & valid).sum())
    # C = capacity_factor * tokens of the group / experts of the group; padding excluded.
    assert rec.counts == [n_text // 4] * 4 + [n_image // 2] * 2
    layer(x, _ctx(modality))  # all valid: the groups, and so the capacities, grow
    assert (
        rec.counts
        == [int((modality == TEXT).sum()) // 4] * 4 + [int((modality == IMAGE).sum()) // 2] * 2
    )


def test_token_choice_capacity_drops_later_tokens():
    from mm_moe.model.moe import router

    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    routing = router.token_choice(scores, scores, k=1, renormalize=False, capacity=2)
    # Expert 0 is everyone's first choice but holds only two: token 2 is dropped.
    assert sorted(zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist())) == [
        (0, 0),
        (1, 0),
        (3, 1),
    ]
    assert routing.dropped_fraction.item() == pytest.approx(0.25)


def test_expert_choice_capacity_formula():
    from mm_moe.model.moe import router

    assert router.expert_capacity(num_tokens=10, num_experts=4, capacity_factor=1.0, k=1) == 2
    assert router.expert_capacity(10, 4, 2.0, 1) == 5
    assert router.expert_capacity(10, 2, 4.0, 1) == 10  # never more than the group
    assert router.expert_capacity(3, 4, 1.0, 1) == 1  # fewer tokens than experts: not 0
    assert router.expert_capacity(0, 4, 1.0, 1) == 0
    # capacity_factor * k * T / E in floats is 62.99999999999999 here: still 63
    assert router.expert_capacity(180, 2, 0.7, 1) == 63
    assert router.token_capacity(50, 1, 1.1, 1) == 55  # 55.00000000000001 in floats


def test_a_group_with_fewer_tokens_than_experts_is_processed_in_training():
    """Two image tokens, two image experts at capacity factor 0.5 (C = int(0.5) = 0 before):
    every expert takes one token, so no image token skips the FFN."""
    layer = _layer(replace(CASES["ec_sigmoid_moma"], capacity_factor=0.5)).train()
    x, _, _ = _inputs()
    modality = torch.full(x.shape[:2], TEXT)
    modality[0, :2] = IMAGE
    ctx = _ctx(modality)
    layer(x, ctx)
    assert ctx.stats["moe/l0/image/pairs"].item() == 2.0  # one per expert
    assert ctx.stats["moe/l0/image/tokens"].item() == 2.0
    assert ctx.stats["moe/l0/image/dropped"].item() < 1.0


def test_flops_meter_counts_the_pairs_actually_computed():
    from mm_moe.model.config import ModelConfig
    from mm_moe.model.flops import FlopsMeter, training_flops_per_token

    cfg, moe = (
        ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1),
        CASES["ec_sigmoid_moma"],
    )
    expected = training_flops_per_token(cfg, moe, 8)
    meter = FlopsMeter(expected, model=(cfg, moe, 8))
    # 3 image tokens, 2 experts at capacity 1 each: 2/3 experts per token, not 1.
    stats = {"tokens_text": 0, "tokens_image": 3}
    stats.update({"moe/l0/image/pairs": 2.0, "moe/l0/image/tokens": 3.0})
    stats.update({"moe/l0/text/pairs": 0.0, "moe/l0/text/tokens": 0.0})
    out = meter.update(stats)
    h = cfg.ffn_dim
    # the experts' forward + backward (6 FLOPs per multiply-accumulate) shrink by 1/3 x 3dh
    saved = 6 * (1 - 2 / 3) * 3 * cfg.d_model * h
    assert out["flops_per_token_image"] == pytest.approx(expected["image"] - saved)
    assert out["flops_per_token_text"] == expected["text"]  # no text tokens: the config's
    assert out["flops_cumulative_image"] == pytest.approx(3 * (expected["image"] - saved))


def test_zero_token_group_is_fine():
    layer = _layer(CASES["ec_sigmoid_moma"])
    x, _, _ = _inputs()
    ctx = _ctx(torch.full(x.shape[:2], TEXT), torch.zeros(x.shape[:2], dtype=torch.bool))
    out = layer(x, ctx)
    assert not out.any()
    assert ctx.stats["moe/l0/image/load"].tolist() == [0.0, 0.0]


def test_fp32_buffers_survive_a_deepspeed_that_casts_buffers_to_bf16():
    """DeepSpeed < 0.19.2 (in the pinned range) runs `module.bfloat16()`, buffers included:
    the experts' bias and load counts and RoPE's frequencies are put back in fp32."""
    from mm_moe.model.config import ModelConfig
    from mm_moe.parallel.deepspeed_fixes import float_buffers, restore_float_buffers

    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64)
    model = cfg.with_vocab(50).build(MOMA_TC)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand_like(buf) / 3)
    saved = float_buffers(model)
    model.bfloat16()  # what the older DeepSpeed does
    restored = restore_float_buffers(model, saved)
    assert any("expert_bias" in n for n in restored) and any("load_accum" in n for n in restored)
    for name, buf in model.named_buffers():
        if name in saved:
            assert buf.dtype == torch.float32 and torch.equal(buf, saved[name]), name


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_group"])
def test_router_logits_are_fp32_from_fp32_copies_in_a_bf16_model(batched):
    """A bf16 model routes on fp32 logits computed from fp32 copies of its bf16 input and
    weights: the expert-choice selection equals the fp32 model's on the same values (a bf16
    product, cast after, rounds scores into ties and picks other tokens). Both routing paths:
    every group at once (moe/batched_choice.py) and group by group."""
    cfg = replace(CASES["ec_sigmoid_moma"], aux_router_coef=0.0)
    torch.manual_seed(0)
    d = 256  # long dot products: bf16 accumulation moves many scores across the top-C cut
    layer = MoELayer(cfg, d, 64, layer_index=0).train()
    layer.batched_routing = batched
    with torch.no_grad():  # values that bf16 holds exactly, so both models see the same
        for p in layer.parameters():
            p.copy_(p.bfloat16().float())
    layer_bf16 = copy.deepcopy(layer).bfloat16()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, d, generator=g).bfloat16()
    modality = (torch.rand(4, 256, generator=g) < 0.4).long()
    routes = {}
    for name, model, inp in [("fp32", layer, x.float()), ("bf16", layer_bf16, x)]:
        seen = {}
        module, attr = (batched_choice, "route") if batched else (router_mod, "expert_choice")
        original = getattr(module, attr)

        def spy(*args, _seen=seen, _original=original):
            if batched:  # (layer, logits_TA, aux_TA, ctx)
                dtype, choice = args[1].dtype, _original(*args)
                chosen = choice.chosen_TA
            else:  # (scores_TE, select_TE, capacity, normalize)
                dtype, choice = args[0].dtype, _original(*args)
                chosen = choice.chosen_TE
            _seen.setdefault("dtypes", []).append(dtype)
            _seen.setdefault("chosen", []).append(chosen.clone())
            return choice

        setattr(module, attr, spy)
        try:
            model(inp, _ctx(modality))
        finally:
            setattr(module, attr, original)
        routes[name] = seen
    assert set(routes["bf16"]["dtypes"]) == {torch.float32}
    assert len(routes["fp32"]["chosen"]) == (1 if batched else 2)
    for a, b in zip(routes["fp32"]["chosen"], routes["bf16"]["chosen"], strict=True):
        assert torch.equal(a, b)


def test_grouped_mm_path_is_guarded_and_runs_where_it_can():
    from mm_moe.errors import UserError
    from mm_moe.model.moe.experts import GroupedExperts, choose_gemm

    cpu = torch.device("cpu")
    # auto on CPU: the grouped kernel in fp32 where rows align, else the loop
    assert choose_gemm("auto", cpu, torch.float32, 16, 32)[0] == "grouped_mm"
    assert choose_gemm("auto", cpu, torch.float32, 16, 30)[0] == "loop"
    assert choose_gemm("auto", cpu, torch.bfloat16, 16, 32)[0] == "loop"
    # forced grouped_mm on CPU runs torch._grouped_mm and equals the loop
    x = torch.randn(10, 16)
    counts = torch.tensor([3, 0, 7])
    loop = GroupedExperts(3, 16, 32, "loop")
    grouped = GroupedExperts(3, 16, 32, "grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    torch.testing.assert_close(grouped(x, counts), loop(x, counts), atol=1e-5, rtol=1e-5)
    assert grouped.last_path == "grouped_mm" and loop.last_path == "loop"
    # rows not a multiple of 16 bytes: forced is a UserError naming the key and constraint
    with pytest.raises(UserError, match=r"moe.gemm=grouped_mm cannot run .*multiples of 4"):
        choose_gemm("grouped_mm", cpu, torch.float32, 16, 30)
    with pytest.raises(UserError, match="multiples of 8 in torch.bfloat16"):
        GroupedExperts(3, 12, 32, "grouped_mm").bfloat16()(x[:, :12].bfloat16(), counts)


def misalign(experts) -> None:
    """The expert weights as views into one flat buffer, 1 element past a 16-byte boundary
    (as ZeRO's flat buffer leaves them after a parameter of an odd size)."""
    weights = (experts.w_gate_up, experts.w_down)
    flat = torch.zeros(1 + sum(w.numel() for w in weights), dtype=weights[0].dtype)
    flat = flat.to(weights[0].device)
    offset = 1
    for w in weights:
        view = flat[offset : offset + w.numel()].view_as(w)
        view.copy_(w.data)
        w.data = view
        offset += w.numel()


def test_grouped_mm_falls_back_on_weights_off_a_16_byte_boundary(caplog):
    """torch._grouped_mm refuses (on CUDA) weights whose address is not 16-byte aligned: the
    experts take the loop (padded on CUDA) and say why, once."""
    from mm_moe.model.moe.experts import GroupedExperts

    x, counts = torch.randn(10, 16), torch.tensor([3, 0, 7])
    grouped = GroupedExperts(3, 16, 32, "grouped_mm")
    want = grouped(x, counts)
    assert grouped.last_path == "grouped_mm"
    GroupedExperts._said_misaligned = False  # once a process: this test's to say
    misalign(grouped)
    assert grouped.w_down.data_ptr() % 16
    with caplog.at_level("WARNING", logger="mm_moe"):
        got = grouped(x, counts)
        grouped(x, counts)
    assert grouped.last_path == "loop"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert caplog.text.count("past a 16-byte boundary") == 1


def test_grouped_mm_backward_takes_no_rows_with_an_expanded_gradient():
    """A rank or group with no rows gets `y.sum()`'s zero-stride gradient: the kernel's
    backward refused it ("Invalid strides/sizes"); now zero gradients."""
    from mm_moe.model.moe.experts import GroupedExperts

    experts = GroupedExperts(2, 8, 8, "grouped_mm")
    x = torch.zeros(0, 8, requires_grad=True)
    experts(x, torch.zeros(2, dtype=torch.long)).sum().backward()
    assert x.grad.shape == (0, 8) and not experts.w_down.grad.any()


def test_grouped_mm_auto_on_gpus_by_capability_dtype_and_alignment(monkeypatch):
    from mm_moe.model.moe.experts import choose_gemm

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose_gemm("auto", cuda, torch.bfloat16, 4096, 1408)[0] == "grouped_mm"
    assert choose_gemm("auto", cuda, torch.float32, 4096, 1408)[0] == "padded"  # fp32
    assert choose_gemm("auto", cuda, torch.bfloat16, 4096, 1410)[0] == "padded"  # alignment
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    path, why = choose_gemm("auto", cuda, torch.bfloat16, 4096, 1408)
    assert path == "padded" and "Hopper" in why
    # Blackwell: the grouped kernel's backward mishandles empty experts (pytorch#172439):
    # auto takes the padded GEMMs, said; forced, it runs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    path, why = choose_gemm("auto", cuda, torch.bfloat16, 4096, 1408)
    assert path == "padded" and "172439" in why
    assert choose_gemm("grouped_mm", cuda, torch.bfloat16, 4096, 1408)[0] == "grouped_mm"


BATCHED_CASES = {
    "moma_3t2i": CASES["ec_sigmoid_moma"],
    "normalized_cosine": CASES["ec_normalized_cosine"],
    "granular_shared": CASES["ec_granular_shared"],
    "mixed_noise_health": MoEConfig(
        experts_per_modality={"mixed": 4},
        capacity_factor=1.5,
        router_noise=0.5,
        health_stats=True,
    ),
}


def _batch(kind: str):
    """A mixed batch with padding; text only (an empty image group); one image token (fewer
    than the image experts); every token valid (no gather where one group holds them all); no
    token valid."""
    x, modality, valid = _inputs(seed=3, B=3, S=10)
    if kind in ("text_only", "few_images"):
        modality = torch.full_like(modality, TEXT)
    if kind == "few_images":
        modality[0, :1] = IMAGE
    if kind == "all_valid":
        valid = torch.ones_like(valid)
    if kind == "all_padding":
        valid = torch.zeros_like(valid)
    return x, modality, valid


def _assert_routing_paths_equal(cfg: MoEConfig, kind: str, training: bool = True) -> None:
    """The layer routing every group at once and group by group: the same output, input and
    parameter gradients (the auxiliary routers' through their loss), the same losses,
    statistics and expert loads."""
    x, modality, valid = _batch(kind)
    results = []
    for batched in (True, False):
        layer = _layer(cfg).train(training)
        layer.batched_routing = batched
        x_in = x.clone().requires_grad_()
        torch.manual_seed(5)  # router noise draws the same numbers
        ctx = _ctx(modality, valid)
        out = layer(x_in, ctx)
        losses = {**ctx.aux_losses, **ctx.aux_router_losses}
        objective = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        (objective + sum(losses.values())).backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results.append((out, x_in.grad, grads, losses, ctx.stats, layer.load_accum))
    (out, gx, grads, losses, stats, load), (out2, gx2, grads2, losses2, stats2, load2) = results
    close = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, out2, **close)
    torch.testing.assert_close(gx, gx2, **close)
    torch.testing.assert_close(load, load2, **close)
    assert grads.keys() == grads2.keys()
    for n in grads:
        if grads[n] is None or grads2[n] is None:
            assert grads[n] is None or not grads[n].any(), n
            assert grads2[n] is None or not grads2[n].any(), n
        else:
            torch.testing.assert_close(grads[n], grads2[n], **close, msg=n)
    assert losses.keys() == losses2.keys() and (losses or not training)
    for n in losses:
        torch.testing.assert_close(losses[n], losses2[n], **close, msg=n)
    assert stats.keys() == stats2.keys()
    for n in stats:
        torch.testing.assert_close(stats[n], stats2[n], **close, msg=n)


@pytest.mark.parametrize("batch", ["mixed", "text_only", "few_images"])
@pytest.mark.parametrize("name", sorted(BATCHED_CASES))
def test_batched_expert_choice_equals_the_per_group_path(name, batch):
    """Expert choice in training, every group at once (moe/batched_choice.py), against group
    by group. (The expert loads of aux-loss-free balancing are not kept: moe.bias_update_rate
    is refused with expert choice.)"""
    _assert_routing_paths_equal(BATCHED_CASES[name], batch)


TOKEN_CHOICE_CASES = {
    # The preset's losses, softmax top-2 over 4 text and 3 image experts.
    "moma_top2_losses": replace(
        CASES["tc_softmax_top2"], load_balance_coef=0.01, router_z_coef=0.001
    ),
    # Sigmoid scores without renormalising, one mixed group, every loss, expert loads.
    "mixed_sigmoid_all": replace(
        CASES["tc_sigmoid_raw_mixed"],
        load_balance_coef=0.1,
        router_z_coef=0.01,
        entropy_local_coef=0.1,
        entropy_global_coef=0.1,
        bias_update_rate=0.01,
        health_stats=True,
    ),
    # MoMa top-1 with sigmoid scores, entropies, expert loads, granular and shared experts.
    "moma_granular_sigmoid": MoEConfig(
        experts_per_modality={"text": 2, "image": 3},
        router="token_choice",
        capacity_factor=0.0,
        granularity=2,
        shared_experts=1,
        entropy_local_coef=0.1,
        entropy_global_coef=0.1,
        bias_update_rate=0.01,
        health_stats=True,
    ),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch", ["mixed", "text_only", "few_images", "all_valid", "all_padding"])
@pytest.mark.parametrize("name", sorted(TOKEN_CHOICE_CASES))
def test_batched_token_choice_equals_the_per_group_path(name, batch, training):
    """Dropless token choice, every group at once (moe/batched_tokens.py), against group by
    group, in training (with its losses and expert loads) and in evaluation."""
    cfg = TOKEN_CHOICE_CASES[name]
    layer = _layer(cfg).train(training)
    assert batched_tokens.applies(layer)
    _assert_routing_paths_equal(cfg, batch, training)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_group"])
def test_renormalized_top1_gates_are_one_and_still_train_the_router(batched):
    """Renormalized top-1 token choice: every gate is 1 (the output is the chosen expert's, so
    upcycling stays function-preserving), yet the router gets the model loss's gradient
    through its score (straight-through); moe.top1_straight_through=false gives it none."""
    x, modality, valid = _inputs(seed=2)
    results = {}
    for straight in (True, False):
        cfg = replace(CASES["tc_top1_renormalized"], top1_straight_through=straight)
        layer = _layer(cfg).train()
        layer.batched_routing = batched
        ctx = _ctx(modality, valid)
        ctx.collect_stats = True
        out = layer(x, ctx)
        assert not ctx.aux_losses  # the model's loss alone reaches the router
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        stats = {n: v for n, v in ctx.stats.items() if n.endswith("/gate_mean")}
        assert stats and all(float(v) == 1.0 for v in stats.values()), stats
        results[straight] = (out.detach(), layer.routers["text"].weight.grad)
    torch.testing.assert_close(results[True][0], results[False][0], atol=0, rtol=0)
    with_grad, without = results[True][1], results[False][1]
    assert with_grad is not None and with_grad.abs().max() > 1e-3
    # p / p: zero up to rounding
    assert without is None or without.abs().max() < 1e-4 * with_grad.abs().max()
