"""MoE configuration (the top-level `moe` config group).

`experts_per_modality` chooses the variant:
- `{}`: no MoE (dense FFN, or per-modality FFNs with model.untie=[ffn]);
- `{text: 4, image: 4}`: MoMa, one expert group per modality; a token is routed only among its
  own modality's experts;
- `{mixed: 8}`: one group shared by all modalities (the standard MoE baseline).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from mm_moe.errors import UserError
from mm_moe.modality import MODALITIES

MIXED = "mixed"


class ExpertGroup(NamedTuple):
    """One group of experts: a modality's (MoMa) or the one `mixed` group."""

    name: str
    modalities: tuple[int, ...]  # modality ids whose tokens it routes
    num_experts: int  # after granularity scaling


@dataclass
class MoEConfig:
    experts_per_modality: dict[str, int] = field(default_factory=dict)
    # Which layers are MoE: "all", or a list of layer indices (dense and MoE layers interleave).
    layers: list[int] | Literal["all"] = "all"
    # expert_choice: each expert takes its top-C tokens of its group (MoMa, not causal: needs
    # the auxiliary routers at inference). token_choice: each token takes its top-k experts.
    router: Literal["expert_choice", "token_choice"] = "expert_choice"
    score: Literal["sigmoid", "softmax"] = "sigmoid"
    # Experts per token (token_choice); the expected experts per token for expert_choice is
    # capacity_factor * top_k. Both scale with granularity.
    top_k: int = 1
    # expert_choice: C = capacity_factor * top_k * tokens in group / experts in group.
    # token_choice: 0 is dropless; > 0 drops tokens past capacity_factor * top_k * T / E.
    # Unset (null): 1.0 for expert_choice, dropless (0) for token_choice.
    capacity_factor: float | None = None
    # Renormalize the selected gates of a token to sum to 1 (token_choice).
    renormalize: bool = True
    # Renormalized top-1 (k = top_k x granularity = 1): the gate is 1 whatever the score, so
    # the router would get no gradient from the model's loss (only from routing losses).
    # true: the gate's value stays 1 (function-preserving upcycling still holds) and its
    # gradient is the score's, as an unnormalized Switch gate's (a straight-through gate).
    # false: a constant gate of 1.
    top1_straight_through: bool = True
    # Fine-grained experts: expert hidden = dense hidden / granularity; the number of experts
    # and top_k are multiplied by it, so active FLOPs stay those of the dense FFN.
    granularity: int = 1
    # Always-on shared experts per group (DeepSeekMoE), each of the fine-grained expert size.
    shared_experts: int = 0
    # Gumbel (logistic) noise on router logits for selection, in training only; 0 is off.
    # MoMa (Lin et al. 2024, 2.3) offers Gumbel-sigmoid noise on expert-choice selection.
    router_noise: float = 0.0
    # > 0: router_noise decays linearly to 0 over this many steps (explore early, then commit
    # to the learned routing); 0 keeps it constant.
    router_noise_anneal_steps: int = 0
    # Learning rate of the router weights relative to optim.lr (their own param group). Below
    # 1 slows the routers relative to the experts, so the experts specialise before the
    # routers commit; a knob of this project (the router is MoE's least stable part: Switch,
    # Fedus et al. 2021, and ST-MoE, Zoph et al. 2022, stabilise it with a smaller init,
    # fp32 and the z-loss). 1: no group of their own.
    router_lr_scale: float = 1.0
    # Router initialisation: normal (N(0, model.init_std^2) rows, like every matrix) or
    # orthogonal (rows orthogonal, with the norm normal rows have): a group's experts start
    # with unrelated preferences, not by-chance correlated ones. Our heuristic against the
    # rows aligning; related: orthogonality against expert collapse (OMoE, Liu et al. 2023).
    router_init: Literal["normal", "orthogonal"] = "normal"
    # Router logits: linear (x . w_e) or cosine (scale x cos(x, w_e): X-MoE, Chi et al. 2022,
    # "On the Representation Collapse of Sparse Mixture of Experts"; routing on the unit
    # sphere keeps a few large-norm directions from deciding for every expert). X-MoE also
    # projects to a low dimension and learns the temperature; here the scale is fixed.
    router_logits: Literal["linear", "cosine"] = "linear"
    cosine_router_scale: float = 10.0
    # Expert choice gates: sigmoid (MoMa: each selected pair weighted by its own score) or
    # normalized (a token's gates over the experts that took it sum to 1, as renormalized
    # token choice; departs from the paper: the FFN output is no longer scaled down by small
    # scores, which is how a collapsing router silences it).
    expert_choice_gate: Literal["sigmoid", "normalized"] = "sigmoid"
    # Routing-health statistics (gates, 0/1/2+ experts per token, router-row cosine,
    # selection overlap, logit mean and std) in the metrics, per layer and group.
    health_stats: bool = True
    # Loss coefficients; 0 turns a loss off.
    load_balance_coef: float = 0.0
    router_z_coef: float = 0.0
    # LIMoE: minimise per-token entropy (local), maximise entropy of the mean routing (global).
    entropy_local_coef: float = 0.0
    entropy_global_coef: float = 0.0
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added for selection only and
    # moved by this rate towards equal load after each optimizer step; 0 is off.
    bias_update_rate: float = 0.0
    # Causal inference for expert_choice (MoMa 2.4): per-expert auxiliary routers predict the
    # selection from the token alone, trained with BCE on stop-gradient inputs.
    aux_router_hidden: int = 64
    aux_router_coef: float = 1.0
    # Expert GEMM: auto picks torch._grouped_mm with bf16 on Hopper GPUs, else batched GEMMs
    # over rows padded to the busiest expert (when that at most doubles the work), else a
    # loop of GEMMs over experts.
    gemm: Literal["auto", "grouped_mm", "padded", "loop"] = "auto"

    def __post_init__(self) -> None:
        if self.capacity_factor is None:
            self.capacity_factor = 1.0 if self.router == "expert_choice" else 0.0
        self._check_groups()
        self._check_ranges()
        self._check_per_token()
        self._check_no_effect()
        if not self.experts_per_modality:
            _warn_unused(self)
        else:
            self._check_routing_no_effect()

    def _check_groups(self) -> None:
        epm = self.experts_per_modality
        if epm:
            keys = set(epm)
            if keys != {MIXED} and keys != set(MODALITIES):
                raise UserError(_groups_message(epm))
            if any(n < 1 for n in epm.values()):
                raise UserError(f"moe.experts_per_modality={epm}: counts must be >= 1")
        if self.layers != "all":
            if any(i < 0 for i in self.layers):
                raise UserError(f"moe.layers={self.layers} must be layer indices >= 0, or 'all'")
            refuse_repeated_layers("moe.layers", self.layers)
            if epm and not self.layers:
                raise UserError(
                    "moe.layers=[] makes no layer MoE while moe.experts_per_modality is set: "
                    "list layer indices or 'all' (moe=none for a dense model)"
                )

    def _check_ranges(self) -> None:
        for key, value, least in (
            ("top_k", self.top_k, 1),
            ("granularity", self.granularity, 1),
            ("shared_experts", self.shared_experts, 0),
            ("aux_router_hidden", self.aux_router_hidden, 1),
            ("router_noise", self.router_noise, 0),
            ("bias_update_rate", self.bias_update_rate, 0),
            ("router_noise_anneal_steps", self.router_noise_anneal_steps, 0),
        ):
            if value < least:
                raise UserError(f"moe.{key}={value} must be >= {least}")
        if self.capacity_factor < 0 or (
            self.router == "expert_choice" and self.capacity_factor <= 0
        ):
            raise UserError(
                f"moe.capacity_factor={self.capacity_factor} must be > 0 for expert_choice "
                "(>= 0 for token_choice, where 0 is dropless)"
            )
        if self.router_lr_scale <= 0 or self.cosine_router_scale <= 0:
            raise UserError(
                f"moe.router_lr_scale={self.router_lr_scale} and moe.cosine_router_scale="
                f"{self.cosine_router_scale} must be positive"
            )

    def _check_per_token(self) -> None:
        """No more experts per token than a group has."""
        for name, n in self.experts_per_modality.items():
            if self.router == "token_choice" and self.top_k > n:
                raise UserError(f"moe.top_k={self.top_k} exceeds the {n} experts of group '{name}'")
            # Expert choice: each expert would take more than every token of its group.
            if self.router == "expert_choice" and self.capacity_factor * self.top_k > n:
                raise UserError(
                    f"moe.capacity_factor={self.capacity_factor} x moe.top_k={self.top_k} "
                    f"exceeds the {n} experts of group '{name}': with expert choice each "
                    "expert would take more than all of the group's tokens; at most "
                    f"{n} experts per token (capacity_factor x top_k <= {n})"
                )

    def _check_no_effect(self) -> None:
        """Keys set to something that changes nothing here are refused, saying why."""
        if self.router == "token_choice" and self.expert_choice_gate != "sigmoid":
            raise UserError(
                f"moe.expert_choice_gate={self.expert_choice_gate} applies to "
                "moe.router=expert_choice; token choice normalizes with moe.renormalize=true"
            )
        if self.router_noise_anneal_steps > 0 and self.router_noise == 0:
            raise UserError(
                f"moe.router_noise_anneal_steps={self.router_noise_anneal_steps} has no effect "
                "with moe.router_noise=0: give the noise to anneal (e.g. moe.router_noise=1.0), "
                "or set it to 0"
            )
        if self.router != "expert_choice":
            return
        if not self.renormalize:
            raise UserError(
                "moe.renormalize=false has no effect with moe.router=expert_choice (it applies "
                "to token choice; expert choice's gates are set by moe.expert_choice_gate)"
            )
        # Both balance token choice; expert choice is balanced by construction.
        if self.bias_update_rate > 0:
            raise UserError(
                f"moe.bias_update_rate={self.bias_update_rate} has no effect with "
                "moe.router=expert_choice: a per-expert bias shifts all of an expert's "
                "scores alike, so it never changes which tokens are its top-C. Set it to 0, "
                "or use moe.router=token_choice"
            )
        if self.load_balance_coef > 0:
            raise UserError(
                f"moe.load_balance_coef={self.load_balance_coef} has no effect with "
                "moe.router=expert_choice: every expert takes exactly C tokens, so the "
                "Switch load-balance loss is a constant. Set it to 0, or use "
                "moe.router=token_choice"
            )

    def _check_routing_no_effect(self) -> None:
        """Routing keys away from their defaults where this routing never reads them (the
        dense case warns instead: `_warn_unused`)."""
        changed = lambda name: getattr(self, name) != _default(name)
        # router.renormalized: only a renormalized token-choice gate over k = 1 expert
        # (top_k x granularity) is the constant 1 the straight-through gate replaces.
        top1_renormalized = self.router == "token_choice" and self.renormalize and self.k == 1
        if not self.top1_straight_through and not top1_renormalized:
            raise UserError(
                "moe.top1_straight_through=false has no effect here: it applies only to "
                "token choice with moe.renormalize=true and one expert per token "
                f"(moe.top_k x moe.granularity = 1), and this is moe.router={self.router}, "
                f"moe.renormalize={str(self.renormalize).lower()}, moe.top_k x "
                f"moe.granularity = {self.k}; drop the key"
            )
        if self.router_logits == "linear" and changed("cosine_router_scale"):
            raise UserError(
                f"moe.cosine_router_scale={self.cosine_router_scale} has no effect with "
                "moe.router_logits=linear (it scales cosine logits): set "
                "moe.router_logits=cosine, or drop the key"
            )
        inert = [f"moe.{n}={getattr(self, n)}" for n in AUX_ROUTER_KEYS if changed(n)]
        if self.router == "token_choice" and inert:
            raise UserError(
                f"{', '.join(inert)} has no effect with moe.router=token_choice: the auxiliary "
                "routers predict expert choice's selection for causal inference, and token "
                "choice is causal without them (none is built). Drop the key, or use "
                "moe.router=expert_choice (mixture-of-depths has its own: model.mod.aux_router_*)"
            )

    def per_micro_batch_routing(self) -> list[str]:
        """What training computes over each micro-batch as a whole (so its result depends on
        the micro-batch size): expert choice's selection, token choice's drops, the balance
        losses."""
        out = []
        if self.router == "expert_choice":
            out.append("expert choice selects each expert's tokens")
        elif self.capacity_factor > 0:
            out.append("token choice drops tokens beyond moe.capacity_factor")
        if self.load_balance_coef or self.entropy_global_coef:
            out.append(
                "the balance losses (moe.load_balance_coef, moe.entropy_global_coef) are averaged"
            )
        return out

    @property
    def enabled(self) -> bool:
        return bool(self.experts_per_modality)

    def groups(self) -> list[ExpertGroup]:
        """The expert groups, in a fixed order (global expert ids follow it)."""
        g = self.granularity
        if MIXED in self.experts_per_modality:
            n = self.experts_per_modality[MIXED] * g
            return [ExpertGroup(MIXED, tuple(range(len(MODALITIES))), n)]
        return [
            ExpertGroup(m, (i,), self.experts_per_modality[m] * g) for i, m in enumerate(MODALITIES)
        ]

    @property
    def k(self) -> int:
        """Experts per token after granularity scaling."""
        return self.top_k * self.granularity

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and (self.layers == "all" or index in self.layers)

    def largest_expert_parallel_size(self, world_size: int) -> int:
        """The largest expert-parallel size that divides the world size and every group's
        expert count (1 without MoE)."""
        if not self.enabled:
            return 1
        return math.gcd(world_size, *(g.num_experts for g in self.groups()))

    def expected_experts_per_token(self) -> float:
        if self.router == "expert_choice":
            return self.capacity_factor * self.k
        return float(self.k)


AUX_ROUTER_KEYS = ("aux_router_hidden", "aux_router_coef")


def _default(name: str):
    """The dataclass default of MoEConfig field `name`."""
    f = MoEConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _groups_message(epm: dict[str, int]) -> str:
    """Why these groups are refused, and the deletions that leave valid ones. The dict is
    merged from every place that sets it (the moe=... preset, then an experiment overlay's
    moe.experts_per_modality, then the command line): choosing another preset does not remove
    the keys an overlay sets, so the advice names the keys to delete, whatever set them."""
    keys, modalities = set(epm), set(MODALITIES)
    head = (
        f"moe.experts_per_modality={epm}: give every modality ({', '.join(MODALITIES)}) a "
        f"count, or one '{MIXED}' group. The dict merges the moe=... preset's with an "
        "experiment overlay's moe.experts_per_modality and the command line's keys, so "
        "choosing another preset does not remove keys an overlay sets"
    )
    delete = lambda names: " ".join(f"~moe.experts_per_modality.{n}" for n in sorted(names))
    unknown = keys - modalities - {MIXED}
    if unknown:
        return f"{head}. Unknown group(s) {sorted(unknown)}: delete them ({delete(unknown)})"
    if MIXED in keys:
        per_modality = "" if modalities <= keys else " and give every modality a count"
        return (
            f"{head}. For the one '{MIXED}' group delete the modality groups on the command "
            f"line ({delete(keys - {MIXED})}); for per-modality groups delete "
            f"{delete([MIXED])}{per_modality}; or leave experts_per_modality out of the overlay"
        )
    missing = sorted(modalities - keys)
    return f"{head}. Add {', '.join(f'moe.experts_per_modality.{m}=N' for m in missing)}"


def _warn_unused(cfg: MoEConfig) -> None:
    """Without experts the model is dense: MoE keys set away from their defaults do nothing.
    A warning, not an error: a dense arm of a script that sets them for its MoE arms is fine."""
    changed = []
    for f in dataclasses.fields(MoEConfig):
        default, value = _default(f.name), getattr(cfg, f.name)
        if f.name in ("capacity_factor", "gemm") or value == default:
            # capacity_factor: resolved from the router, set either way; gemm: a kernel
            # choice that scripts set for every arm (the study's dense runs), harmless here
            continue
        changed.append(f"moe.{f.name}={value}")
    if changed:
        logging.getLogger("mm_moe").warning(
            "%s set, but moe.experts_per_modality is empty: the model has no MoE layer (dense); "
            "give it experts (e.g. moe=moma_4t4i_ec) or drop these keys",
            ", ".join(changed),
        )


def refuse_repeated_layers(key: str, indices: list[int]) -> None:
    """A layer listed twice is most likely a typo for another layer (`[1,1,3]` for `[1,2,3]`):
    refused, not read as the set."""
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise UserError(f"{key}={indices} lists layer(s) {repeated} more than once")
