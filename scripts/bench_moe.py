"""Forward+backward time of the MoE layer vs a dense SwiGLU with equal active FLOPs and vs
DeepSpeed's MoE layer (top-k, capacity factor 1.25), measured in one run.

    .venv/bin/python scripts/bench_moe.py [--json] [--iters 10] [--device cuda] [--smoke]

`--smoke`: every case at 128 tokens, 2 iterations (a test runs it; the figures mean nothing).

On CUDA everything runs in bf16, and each row says which expert GEMM path ours took.

Prints one JSON object per case with --json (fields: case, num_experts, top_k, tokens, hidden,
ours_ms, dense_ms, deepspeed_ms, ratio_vs_dense, speedup_vs_deepspeed), else a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from dataclasses import dataclass

import torch

from mm_moe.model.context import ForwardContext
from mm_moe.model.mlp import SwiGLU
from mm_moe.model.moe.config import MoEConfig
from mm_moe.model.moe.layer import MoELayer
from mm_moe.utils.cuda_check import cuda_missing


@dataclass
class Case:
    name: str
    moe: MoEConfig
    tokens: int = 4096
    hidden: int = 256  # model width d
    ffn: int = 512  # dense FFN hidden that the experts are cut from (f)
    image_fraction: float = 0.5
    baseline: MoEConfig | None = None  # the ungrouped layer with the same E and k


def _cases(tokens: int) -> list[Case]:
    tc = dict(router="token_choice", score="softmax", capacity_factor=0.0)
    cases = [
        Case("E8_k2", MoEConfig(experts_per_modality={"mixed": 8}, top_k=2, **tc)),
        Case(
            "moma_4t4i_k2",
            MoEConfig(experts_per_modality={"text": 4, "image": 4}, top_k=2, **tc),
            baseline=MoEConfig(experts_per_modality={"mixed": 8}, top_k=2, **tc),
        ),
        Case(
            "moma_4t4i_expert_choice",
            MoEConfig(experts_per_modality={"text": 4, "image": 4}, capacity_factor=2.0),
            baseline=MoEConfig(experts_per_modality={"mixed": 8}, capacity_factor=2.0),
        ),
        Case(
            "fine_grained_E32_k4",
            MoEConfig(experts_per_modality={"mixed": 8}, granularity=4, top_k=1, **tc),
        ),
    ]
    for case in cases:
        case.tokens = tokens
    return cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fns: dict, iters: int) -> dict[str, float]:
    """Median milliseconds of each function, run round-robin so that a change in machine load
    affects every contender alike."""
    for fn in fns.values():
        fn()
        fn()
    samples = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def _fwd_bwd(module_call, x):
    def run():
        x.grad = None
        out = module_call(x)
        out.backward(torch.ones_like(out))

    return run


def _ours(case: Case, moe: MoEConfig, x, modality):
    layer = MoELayer(moe, case.hidden, case.ffn, layer_index=0).to(x.device, x.dtype)
    B = 1

    def call(inp):
        ctx = ForwardContext.for_layer(modality.view(B, -1))
        return layer(inp.view(B, -1, case.hidden), ctx)

    call.layer = layer
    return call


def _deepspeed_layer(case: Case, num_experts: int, k: int, expert_hidden: int, device, dtype):
    from deepspeed.moe.layer import MoE

    layer = MoE(
        hidden_size=case.hidden,
        expert=SwiGLU(case.hidden, expert_hidden),
        num_experts=num_experts,
        ep_size=1,
        k=k,
        capacity_factor=1.25,
        eval_capacity_factor=1.25,
        min_capacity=4,
        drop_tokens=True,
    ).to(device, dtype)
    return lambda inp: layer(inp.view(1, -1, case.hidden))[0]


def _init_deepspeed(device: torch.device) -> None:
    """One process group of one rank: DeepSpeed's MoE creates its groups."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # never a fixed port: runs overlap
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.utils.logger.setLevel("WARNING")
    from mm_moe.parallel.deepspeed_fixes import skip_shm_build

    skip_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def _case_row(case: Case, iters: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Our layer, a dense SwiGLU of the same active width, DeepSpeed's MoE (top-1/2 only)
    and the ungrouped baseline, timed forward+backward on the same tokens."""
    moe = case.moe
    x = torch.randn(case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
    modality = (torch.rand(case.tokens, device=device) < case.image_fraction).long()
    num_experts = sum(g.num_experts for g in moe.groups())
    expert_hidden = case.ffn // moe.granularity
    active_hidden = int(moe.expected_experts_per_token() * expert_hidden)
    dense = SwiGLU(case.hidden, active_hidden).to(device, dtype)
    ours = _ours(case, moe, x, modality)
    fns = {"ours": _fwd_bwd(ours, x), "dense": _fwd_bwd(dense, x)}
    ds_k = round(moe.expected_experts_per_token())
    if ds_k <= 2:  # DeepSpeed's gate supports k = 1 or 2
        ds = _deepspeed_layer(case, num_experts, ds_k, expert_hidden, device, dtype)
        fns["deepspeed"] = _fwd_bwd(ds, x)
    if case.baseline is not None:
        fns["ungrouped"] = _fwd_bwd(_ours(case, case.baseline, x, modality), x)
    ms = _time_ms(fns, iters)
    row = {
        "case": case.name,
        "num_experts": num_experts,
        "top_k": moe.k,
        "tokens": case.tokens,
        "hidden": case.hidden,
        "device": device.type,
        "gemm_path": ours.layer.experts.last_path,
        "ours_ms": ms["ours"],
        "dense_ms": ms["dense"],
        "deepspeed_ms": ms.get("deepspeed"),
        "ratio_vs_dense": ms["ours"] / ms["dense"],
        "speedup_vs_deepspeed": ms["deepspeed"] / ms["ours"] if "deepspeed" in ms else None,
    }
    if "ungrouped" in ms:
        row["ungrouped_ms"] = ms["ungrouped"]
        row["ratio_vs_ungrouped"] = ms["ours"] / ms["ungrouped"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="128 tokens, 2 iterations")
    args = parser.parse_args()
    if args.device == "cuda" and (why := cuda_missing()):
        parser.error(f"--device cuda: {why}; use --device cpu")
    if args.smoke:
        args.tokens, args.iters = 128, 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _init_deepspeed(device)
    torch.manual_seed(0)
    rows = []
    for case in _cases(args.tokens):
        rows.append(_case_row(case, args.iters, device, dtype))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        for row in rows:
            print(
                "  ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )


if __name__ == "__main__":
    main()
