"""Plan a job before launching it: parameters, FLOPs, memory per GPU and all-to-all volume.

    python -m mm_moe.plan model=moma_4t4i_1.4b cluster.nodes=8 cluster.gpus_per_node=8
    python -m mm_moe.plan --config-dir my_configs experiment=mine cluster.nodes=2

Takes the training command's overrides plus `cluster.*` (nodes, gpus_per_node,
gpu_memory_gb, data_vocab_size). Estimates assume what training on GPUs does: under
`trainer.precision` auto or bf16, bf16 weights and gradients with fp32 master weights and Adam
moments (DeepSpeed's bf16 optimizer, which runs at ZeRO stage 1 or above); under fp32, fp32
weights, gradients and moments. ZeRO partitions optimizer state (stage >= 1) and gradients
(stage 2) over the data-parallel group for dense parameters and over the expert-data-parallel
group for expert parameters. Activations per layer come from the model's shapes and
`trainer.activation_checkpointing`, plus the output layer's chunked loss (plan_memory.py).
A model whose vocabulary comes from the data (`model.vocab_size=0`, the tiny presets) is
planned with the configured data's vocabulary, as training would build it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from mm_moe.cli import compose, exits_on_failure, usage
from mm_moe.config import ConfigError, TrainConfig, from_dict
from mm_moe.config.overrides import command_line, options_first
from mm_moe.data.config import tokenizer_unread
from mm_moe.errors import UserError
from mm_moe.parallel.config import optimizer_zero_stage
from mm_moe.plan_memory import activation_bytes, logits_bytes
from mm_moe.utils import units

# 65,536 text ids, 5 specials and Chameleon's 8,192 image codes.
FALLBACK_DATA_VOCAB = 65536 + 5 + 8192


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    # Vocabulary size when the model takes it from the data (model.vocab_size=0). 0: the
    # configured data's (data.source and tokenizer, as training builds it); where that cannot
    # be read here (tokenizer files elsewhere), FALLBACK_DATA_VOCAB with a warning.
    data_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1 or self.gpu_memory_gb <= 0:
            raise UserError(
                "cluster.nodes and cluster.gpus_per_node must be >= 1, cluster.gpu_memory_gb > 0"
            )
        if self.data_vocab_size < 0:
            raise UserError(f"cluster.data_vocab_size={self.data_vocab_size} must be >= 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def _expert_params(cfg: TrainConfig, model) -> int:
    moe = cfg.moe
    if not moe.enabled:
        return 0
    h = model.ffn_dim // moe.granularity
    per_layer = sum(g.num_experts for g in moe.groups()) * 3 * model.d_model * h
    return per_layer * sum(moe.is_moe_layer(i) for i in range(model.n_layers))


def data_vocab_size(cfg: TrainConfig, cluster: ClusterConfig, warnings: list[str]) -> int:
    """The vocabulary a model with `vocab_size=0` gets from the configured data."""
    if cluster.data_vocab_size:
        return cluster.data_vocab_size
    if cfg.data.source == "synthetic_patterns" and (unread := tokenizer_unread(cfg.tokenizer)):
        warnings.append(unread)
    try:
        return cfg.data.vocab(cfg.tokenizer).size
    except (UserError, OSError) as e:
        warnings.append(
            f"the data's vocabulary could not be read here ({e}); planned with "
            f"{FALLBACK_DATA_VOCAB:,} ids: set cluster.data_vocab_size"
        )
        return FALLBACK_DATA_VOCAB


def _refuse_layout(cfg: TrainConfig, world: int, ep: int) -> None:
    """The layouts training refuses, refused here with every reason: a plan for a split that
    cannot exist (1.5 experts per rank) would size memory nobody can train in."""
    problems = []
    if ep > 1 and not cfg.moe.enabled:
        problems.append(
            f"parallel.expert_parallel_size={ep} without MoE layers (moe=none); use "
            "parallel.expert_parallel_size=1"
        )
    if world % ep:
        problems.append(
            f"parallel.expert_parallel_size={ep} does not divide the world size {world}"
        )
    for group in cfg.moe.groups() if cfg.moe.enabled else []:
        if group.num_experts % ep:
            problems.append(
                f"group '{group.name}' has {group.num_experts} experts, not divisible by EP={ep}"
            )
    per_step = cfg.trainer.micro_batch_size * world
    if cfg.trainer.global_batch_size % per_step:
        problems.append(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not a "
            f"multiple of micro_batch_size x world size = {per_step}"
        )
    if problems:
        raise UserError(f"training refuses this layout on {world} GPUs: " + "; ".join(problems))


def _memory_gib(cfg: TrainConfig, model, total_params: int, world: int, ep: int) -> dict:
    """Per GPU: weights, gradients and optimizer state (ZeRO shards optimizer state from stage
    1, gradients from stage 2: dense over data-parallel ranks, experts over
    expert-data-parallel ranks), and activations. bf16 (GPU's auto): 2-byte weights and
    gradients, fp32 master weights and moments (12 bytes); fp32: 4, 4 and the moments (8)."""
    bf16 = cfg.trainer.precision != "fp32"
    zero = optimizer_zero_stage(cfg.parallel.zero_stage, bf16)
    weight_bytes, state_bytes = (2, 12) if bf16 else (4, 8)
    expert = _expert_params(cfg, model)
    dense = total_params - expert
    edp = max(1, world // ep)
    shard = lambda stage_needed, n, group: n / group if zero >= stage_needed else n
    sharded = lambda stage_needed: (
        shard(stage_needed, dense, world) + shard(stage_needed, expert / ep, edp)
    )
    gib = 2**30
    mem = {
        "params_gib": weight_bytes * (dense + expert / ep) / gib,
        "grads_gib": weight_bytes * sharded(2) / gib,
        "optimizer_gib": state_bytes * sharded(1) / gib,
    }
    tokens_micro = cfg.trainer.micro_batch_size * cfg.data.seq_len
    mode = cfg.trainer.activation_checkpointing
    mem["activations_gib"] = activation_bytes(model, cfg.moe, tokens_micro, mode) / gib
    mem["logits_gib"] = logits_bytes(model, tokens_micro) / gib
    mem["total_gib"] = sum(mem.values())
    return mem


def _all_to_all_gib(cfg: TrainConfig, model, world: int, ep: int) -> float:
    """Each routed copy of a token crosses the network twice (dispatch, combine) forward and
    twice backward, in bf16, when its expert lives on another rank."""
    if not cfg.moe.enabled:
        return 0.0
    tokens_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    moe_layers = sum(cfg.moe.is_moe_layer(i) for i in range(model.n_layers))
    copies = tokens_step / world * moe_layers * cfg.moe.expected_experts_per_token()
    return copies * model.d_model * 2 * 4 * (ep - 1) / ep / 2**30


def plan(cfg: TrainConfig, cluster: ClusterConfig) -> dict:
    cfg = cfg.for_world(cluster.world_size)
    world, ep = cluster.world_size, cfg.parallel.expert_parallel_size
    _refuse_layout(cfg, world, ep)
    warnings: list[str] = []
    model = cfg.model
    if not model.vocab_size:  # taken from the data, as training does
        model = model.with_vocab(data_vocab_size(cfg, cluster, warnings))
    params = model.num_params(cfg.moe)
    mem = _memory_gib(cfg, model, params["total"], world, ep)
    if mem["total_gib"] > cluster.gpu_memory_gb:
        warnings.append(
            f"estimated {mem['total_gib']:.1f} GiB per GPU exceeds "
            f"cluster.gpu_memory_gb={cluster.gpu_memory_gb}"
        )
    return {
        "world_size": world,
        "vocab_size": model.vocab_size,
        "params_total": params["total"],
        "params_expert": _expert_params(cfg, model),
        "params_active": params["active"],
        "flops_per_token": model.flops_per_token(cfg.data.seq_len, cfg.moe),
        "tokens_per_step": cfg.trainer.global_batch_size * cfg.data.seq_len,
        "memory_per_gpu": mem,
        "all_to_all_gib_per_gpu_per_step": _all_to_all_gib(cfg, model, world, ep),
        "expert_parallel_size": ep,
        "warnings": warnings,
    }


def _print(name: str, p: dict) -> None:
    print(f"plan for {name} on {p['world_size']} GPUs")
    print(
        f"  parameters: {units.count(p['params_total'])} total "
        f"({units.count(p['params_expert'])} in experts); active per token: "
        + ", ".join(f"{m} {units.count(v)}" for m, v in p["params_active"].items())
    )
    print(f"  vocabulary: {p['vocab_size']:,} ids")
    print(
        "  training FLOPs per token: "
        + ", ".join(f"{m} {units.flop(v)}" for m, v in p["flops_per_token"].items())
    )
    print(f"  tokens per step: {p['tokens_per_step']:,}")
    print(
        "  memory per GPU: "
        + ", ".join(
            f"{k.removesuffix('_gib')} {units.gib(v)}" for k, v in p["memory_per_gpu"].items()
        )
    )
    ep = p["expert_parallel_size"]
    print(
        f"  all-to-all per GPU per step: {units.gib(p['all_to_all_gib_per_gpu_per_step'])} "
        f"(parallel.expert_parallel_size={ep}"
        + ("; every rank holds every expert: none" if ep == 1 else "")
        + ")"
    )
    for w in p["warnings"]:
        print(f"  WARNING: {w}")


def _cluster_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(`cluster.*` values as numbers, the other arguments)."""
    cluster_args, rest = {}, []
    for arg in argv:
        if arg.startswith("cluster.") and "=" in arg:
            key, value = arg.split("=", 1)
            try:
                number = float(value) if "." in value else int(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number") from None
            cluster_args[key.split(".", 1)[1]] = number
        else:
            rest.append(arg)
    return cluster_args, rest


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\n" + usage(ClusterConfig, "cluster.*").split("\n", 1)[1])
        sys.exit(0)
    with exits_on_failure("mm_moe.plan"):  # every error: exit status, secrets masked
        cluster_args, rest = _cluster_args(argv)
        cluster = from_dict(ClusterConfig, cluster_args, prefix="cluster")
        # Hydra's own flags, anywhere: --config-dir as the training takes it
        args = command_line(options_first(rest))
        rest = args.overrides
        cfg = compose(rest, config_dir=args.config_dir)
        result = plan(cfg, cluster)
    choices = [a for a in rest if "=" in a and "." not in a.split("=", 1)[0]]  # model=..., moe=...
    named = cfg.name if cfg.name != "default" else "the default config"
    _print(f"{named} with {' '.join(choices)}" if choices else named, result)
    return result


if __name__ == "__main__":
    main()
