"""Upcycling: a dense model's weights -> the weights of an MoE / MoMa / MoT model.

- Sparse upcycling (Komatsuzaki et al. 2023): every expert of every modality group is a copy of
  the dense FFN.
- Granular upcycling (He et al. 2024, "Upcycling Large Language Models into Mixture of
  Experts", NVIDIA; Megatron-LM's upcycling_utils): with moe.granularity=G the FFN's hidden
  units are split into G shards, expert c*G + j of a group is shard j of copy c, and the
  router rows of one copy's G shards are equal ("virtual groups"), so top-(k*G) selection
  takes whole copies. Weight scaling: see `upcycle_experts`.
- Drop-Upcycling (Nakamura et al. 2025): in each expert a different random subset of
  ceil(r * h) hidden units gets fresh gate/up rows and down columns, drawn from a normal with
  the mean and std of the source matrix.
- MoT (Liang et al. 2024): per-modality copies of attention projections, norms (and the FFN
  when it is untied without MoE) are exact copies.
- New vocabulary rows (image codes, special tokens): the mean of the source rows plus
  Gaussian noise of `new_rows_noise` times the per-dimension std of the rows (Hewitt 2021:
  a new token starts as an average token, with a little spread so new tokens differ).

Shape legend: V vocabulary, d width, f dense FFN hidden, G granularity, h = f / G expert
hidden, C copies of the dense FFN in a group, E = C * G experts of a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mm_moe.errors import UserError
from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.mod import MoDBlock
from mm_moe.model.modality_ops import ModalityFFN
from mm_moe.model.moe.layer import MoELayer


@dataclass
class UpcycleOptions:
    drop_ratio: float = 0.0
    router_init_std: float = 0.02
    expert_noise: float = 0.0
    new_rows_noise: float = 0.1


def _normal(shape, mean, std, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std + mean


def extend_rows(w_VD: torch.Tensor, num_rows: int, noise: float, gen) -> torch.Tensor:
    """w_VD with rows added up to `num_rows`: the mean row plus noise * per-dim std."""
    V, D = w_VD.shape
    assert num_rows >= V, (num_rows, V)
    if num_rows == V:
        return w_VD.clone()
    mean_D, std_D = w_VD.mean(0), w_VD.std(0)
    new_ND = mean_D + noise * std_D * torch.randn(num_rows - V, D, generator=gen)
    return torch.cat([w_VD, new_ND])


def drop_units(hidden: int, drop_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """A random subset of ceil(drop_ratio * hidden) hidden units (Drop-Upcycling)."""
    return torch.randperm(hidden, generator=gen)[: math.ceil(drop_ratio * hidden)]


def upcycle_experts(
    w_gate_fd: torch.Tensor,
    w_up_fd: torch.Tensor,
    w_down_df: torch.Tensor,
    copies: int,
    granularity: int,
    gen: torch.Generator,
    drop_ratio: float = 0.0,
    noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked experts (`w_gate_up` [E, d, 2h], `w_down` [E, h, d]) from one dense SwiGLU.

    Weight scaling (NVIDIA's granular upcycling): with renormalized top-(k*G) routing over
    virtual groups the G shards of a chosen copy share its gate, and the gates of all k*G
    chosen experts sum to 1, so the layer returns sum_c w_c * sum_j shard_j(x) with
    sum_c G * w_c = 1: the dense FFN divided by G. Multiplying each expert's output by G
    preserves the dense function. NVIDIA spreads the factor as G^(1/3) over the gate, up and
    down projections of a GLU, which is exact only for a linear activation (silu is not
    homogeneous); here it goes on the two linear maps, sqrt(G) on `up` and on `down`, so the
    product is exactly G and the upcycled layer equals the dense one to rounding.
    """
    f, d = w_gate_fd.shape
    G = granularity
    assert f % G == 0 and w_up_fd.shape == (f, d) and w_down_df.shape == (d, f)
    h = f // G
    E = copies * G
    # Expert c*G + j holds shard j (hidden units [j*h, (j+1)*h)) of copy c.
    gate_Ehd = w_gate_fd.reshape(G, h, d).repeat(copies, 1, 1)
    up_Ehd = w_up_fd.reshape(G, h, d).repeat(copies, 1, 1)
    down_Edh = w_down_df.reshape(d, G, h).permute(1, 0, 2).repeat(copies, 1, 1)
    if drop_ratio > 0:
        stats = [(w.mean().item(), w.std().item()) for w in (w_gate_fd, w_up_fd, w_down_df)]
        for e in range(E):
            units = drop_units(h, drop_ratio, gen)
            n = len(units)
            gate_Ehd[e, units] = _normal((n, d), *stats[0], gen)
            up_Ehd[e, units] = _normal((n, d), *stats[1], gen)
            down_Edh[e, :, units] = _normal((d, n), *stats[2], gen)
    if noise > 0:
        for w_E, src in ((gate_Ehd, w_gate_fd), (up_Ehd, w_up_fd), (down_Edh, w_down_df)):
            w_E += noise * src.std() * torch.randn(w_E.shape, generator=gen)
    scale = math.sqrt(G)
    w_gate_up_Ed2h = torch.cat([gate_Ehd, up_Ehd * scale], dim=1).transpose(1, 2).contiguous()
    w_down_Ehd = (down_Edh * scale).transpose(1, 2).contiguous()
    return w_gate_up_Ed2h, w_down_Ehd


def virtual_group_router(
    copies: int, granularity: int, d: int, std: float, gen, orthogonal: bool = False
) -> torch.Tensor:
    """Router weight [E, d]: one N(0, std^2) row per copy, shared by its G shards; with
    `orthogonal` (moe.router_init=orthogonal) the copies' rows are orthogonal, each with a
    normal row's norm (std * sqrt(d)), as `MoELayer.init_routers` makes them."""
    base_Cd = torch.randn(copies, d, generator=gen) * std
    if orthogonal and copies <= d:
        q_dC, r_CC = torch.linalg.qr(torch.randn(d, copies, generator=gen))
        base_Cd = (q_dC * torch.sign(torch.diagonal(r_CC))).T * (std * math.sqrt(d))
    return base_Cd.repeat_interleave(granularity, dim=0)


def _blocks(model: nn.Module):
    """(layer index, the transformer block, its parameter prefix) of every layer."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer, MoDBlock):
            yield i, layer.block, f"layers.{i}.block."
        else:
            yield i, layer, f"layers.{i}."


def build_state(
    src: dict[str, torch.Tensor], target: nn.Module, opts: UpcycleOptions, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The target's weights (saved names: parameters once each, persistent buffers) from the
    dense source state, and the names that keep the target's fresh initialisation."""
    params = dict(target.named_parameters())
    state = {n: p.detach().clone() for n, p in params.items()}
    for name, buf in target.named_buffers():
        if name in target.state_dict():
            state[name] = buf.detach().clone()
    assigned, used = set(), set()

    def put(name: str, value: torch.Tensor) -> None:
        assert state[name].shape == value.shape, (name, state[name].shape, value.shape)
        state[name] = value.to(state[name].dtype).contiguous()
        assigned.add(name)

    def copy(name: str, src_name: str) -> None:
        """The source tensor, or one copy per modality for an untied (MoT) parameter."""
        value = src[src_name]
        used.add(src_name)
        if value.dim() > state[name].dim():
            raise UserError(
                f"{src_name}: the source holds one per modality (untied, MoT) and the target "
                "one for all; keep the source's model.untie in the target's untie="
            )
        if state[name].shape != value.shape:
            value = value.unsqueeze(0).expand(state[name].shape[0], *value.shape)
        put(name, value.clone())

    V = target.cfg.vocab_size
    put("embed.weight", extend_rows(src["embed.weight"], V, opts.new_rows_noise, gen))
    used.add("embed.weight")
    if "lm_head.weight" in state:  # untied in the target
        head = src.get("lm_head.weight", src["embed.weight"])
        put("lm_head.weight", extend_rows(head, V, opts.new_rows_noise, gen))
        used.add("lm_head.weight")
    copy("norm.weight", "norm.weight")
    for i, block, prefix in _blocks(target):
        sp = f"layers.{i}."
        for name, _ in block.named_parameters():
            if not name.startswith("ffn."):
                copy(prefix + name, sp + name)
        _ffn(block.ffn, prefix + "ffn.", modality_ffns(src, sp, used), opts, gen, put, i)
    unused = sorted(set(src) - used)
    assert not unused, f"source tensors not mapped: {unused[:5]}"
    fresh = sorted(set(params) - assigned)
    return state, fresh


def _ffn(ffn: nn.Module, prefix: str, ffn_src: list, opts, gen, put, layer: int) -> None:
    """The target FFN of one layer from the source's FFN of each modality."""
    if isinstance(ffn, MoELayer):
        _moe_layer(ffn, prefix, ffn_src, opts, gen, put)
    elif isinstance(ffn, ModalityFFN):
        for m in range(len(ffn.experts)):
            for w, value in zip(("w_gate", "w_up", "w_down"), ffn_src[m]):
                put(prefix + f"experts.{m}.{w}.weight", value.clone())
    else:
        if ffn_src[0] is not ffn_src[-1]:
            raise UserError(
                f"layer {layer}: the source has one FFN per modality; a dense target FFN "
                "cannot hold them (keep model.untie=[ffn] or use MoE groups per modality)"
            )
        for w, value in zip(("w_gate", "w_up", "w_down"), ffn_src[0]):
            put(prefix + f"{w}.weight", value.clone())


def modality_ffns(src: dict, sp: str, used: set) -> list[tuple[torch.Tensor, ...]]:
    """(w_gate [f, d], w_up [f, d], w_down [d, f]) of each modality's FFN in layer `sp`: the
    dense FFN for every modality, or (MoMa's recipe, its section 2.5) the source's own FFN of
    each modality: per-modality FFNs (model.untie=[ffn]) or one expert per modality group."""
    names = ("w_gate", "w_up", "w_down")
    if sp + "ffn.w_gate.weight" in src:
        keys = [sp + f"ffn.{w}.weight" for w in names]
        used.update(keys)
        return [tuple(src[k] for k in keys)] * NUM_MODALITIES
    if sp + "ffn.experts.0.w_gate.weight" in src:
        out = []
        for m in range(NUM_MODALITIES):
            keys = [sp + f"ffn.experts.{m}.{w}.weight" for w in names]
            used.update(keys)
            out.append(tuple(src[k] for k in keys))
        return out
    gate_up, down = src[sp + "ffn.experts.w_gate_up"], src[sp + "ffn.experts.w_down"]
    used.update(k for k in src if k.startswith(sp + "ffn."))  # the source's routers are not kept
    h = down.shape[1]
    experts = [
        (gate_up[e, :, :h].t(), gate_up[e, :, h:].t(), down[e].t()) for e in range(len(down))
    ]
    return experts * NUM_MODALITIES if len(experts) == 1 else experts


def _moe_layer(layer: MoELayer, prefix: str, ffn_src, opts: UpcycleOptions, gen, put) -> None:
    G = layer.cfg.granularity
    gate_up, down = [], []
    d = ffn_src[0][0].shape[1]
    for group in layer.group_specs:
        name, copies = group.name, group.num_experts // G
        sources = {id(ffn_src[m]) for m in group.modalities}
        if len(sources) > 1:
            raise UserError(
                f"expert group '{name}' serves every modality, but the source has one FFN per "
                "modality: upcycle into one group per modality (moe.experts_per_modality "
                "text=N image=N)"
            )
        w_gu, w_d = upcycle_experts(
            *ffn_src[group.modalities[0]],
            copies,
            G,
            gen,
            drop_ratio=opts.drop_ratio,
            noise=opts.expert_noise,
        )
        gate_up.append(w_gu)
        down.append(w_d)
        put(
            f"{prefix}routers.{name}.weight",
            virtual_group_router(
                copies, G, d, opts.router_init_std, gen, layer.cfg.router_init == "orthogonal"
            ),
        )
        if name in layer.shared:
            # Shared experts start with a zero output projection: they add nothing at first
            # (function-preserving) and their down projection gets gradients from step 1.
            w = f"{prefix}shared.{name}.w_down.weight"
            put(w, torch.zeros_like(layer.shared[name].w_down.weight))
    # Global expert ids follow MoEConfig.groups() order, as the layer's offsets do.
    put(f"{prefix}experts.w_gate_up", torch.cat(gate_up))
    put(f"{prefix}experts.w_down", torch.cat(down))
