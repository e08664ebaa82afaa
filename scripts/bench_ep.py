"""Expert parallelism on 2 ranks: EP=1 (every rank holds every expert; plain data parallelism)
vs EP=2 (experts sharded, tokens exchanged by all-to-all), measured in one run.

    .venv/bin/python scripts/bench_ep.py [--json] [--steps 8] [--d-model 256] [--experts 8]
        [--smoke]   # d=32, 2 experts a group, 1 layer, 1 step, one pair of processes (a test)

Both configurations build the same MoMa model (text + image expert groups, expert choice) and
its DeepSpeed engine (ZeRO-0, fp32 on CPU; gloo on CPU, nccl with 2 GPUs). Times come from one
pair of processes that steps both configurations in turn (a change in machine load hits both
alike); memory from one fresh pair of processes per configuration (each peak is its own):
- step time: median of `--steps` optimizer steps of mm_moe.trainer.step.train_step;
- MoE layer time: forward+backward of one MoE layer on a fixed batch, and the part of it spent
  in the exchanges (count exchange and both all-to-alls, forward and backward);
- peak memory per rank: peak RSS on CPU (torch.cuda.max_memory_allocated on GPU), and its growth
  from before the model was built (model state, optimizer state, activations; every rank
  builds the whole model and then keeps its experts, so the growth includes the whole
  model's weights once);
- expert-parameter memory per rank: bytes of the expert weights, their gradients and their
  Adam moments that the rank holds after the steps.
Prints per-configuration figures and the EP=2 / EP=1 ratios (one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _batches(args, vocab: int, rank: int, step: int, micro: int):
    from mm_moe.data.batch import Batch

    rng = np.random.default_rng(1000 * step + rank)
    out = []
    for _ in range(micro):
        T = args.seq_len + 1
        tokens = rng.integers(0, vocab, (args.micro_batch, T))
        # Half the sequence text, half image: every expert group gets work.
        modality = np.zeros((args.micro_batch, T), dtype=np.int64)
        modality[:, T // 2 :] = 1
        doc = np.zeros_like(tokens)
        pos = np.broadcast_to(np.arange(T), tokens.shape)
        out.append(Batch.from_tokens(tokens, modality, doc, pos, np.ones_like(tokens, bool)))
    return out


def _expert_bytes(engine) -> int:
    """Expert weights, gradients and Adam moments held by this rank (the moments are keyed by
    parameter at ZeRO-0; under ZeRO-1/2 they live in flat partitions and are not counted)."""
    from mm_moe.model.moe.experts import GroupedExperts

    experts = [m for m in engine.module.modules() if isinstance(m, GroupedExperts)]
    params = [p for m in experts for p in m.parameters()]
    total = 0
    state = getattr(engine.optimizer, "state", {})
    for p in params:
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
        for v in state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def _layer_step(layer, args, device):
    """One forward+backward of an MoE layer on a fixed batch; returns a callable."""
    from mm_moe.model.context import ForwardContext

    B, S, d = args.micro_batch, args.seq_len, args.d_model
    gen = torch.Generator().manual_seed(int(os.environ["RANK"]))
    x = torch.randn(B, S, d, generator=gen).to(device)
    modality = torch.zeros(B, S, dtype=torch.long, device=device)
    modality[:, S // 2 :] = 1

    def run():
        ctx = ForwardContext.for_layer(modality)
        layer(x.clone().requires_grad_(), ctx).sum().backward()

    return run


def _build(args, ep_size: int, device):
    """The engine as training builds it (mm_moe.parallel.parallelize)."""
    from mm_moe.checkpoint.rng import seed_all
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.parallel.distributed import DistInfo
    from mm_moe.parallel.parallelize import parallelize

    cfg = from_dict(
        TrainConfig,
        {
            "model": {
                "vocab_size": args.vocab,
                "d_model": args.d_model,
                "n_layers": args.layers,
                "n_heads": 4,
                "n_kv_heads": 2,
                "ffn_hidden": args.ffn,
            },
            "moe": {"experts_per_modality": {"text": args.experts, "image": args.experts}},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "parallel": {"expert_parallel_size": ep_size, "zero_stage": args.zero_stage},
            "trainer": {
                "global_batch_size": args.micro_batch * args.accumulation * WORLD,
                "micro_batch_size": args.micro_batch,
                "max_steps": 1000,
                "precision": "bf16" if device.type == "cuda" else "fp32",
            },
        },
    )
    seed_all(0)
    model = cfg.model.build(cfg.moe).to(device)
    dist_info = DistInfo(int(os.environ["RANK"]), WORLD, 0, device, args.backend)
    return parallelize(model, cfg, dist_info)


def _timed(fn, device) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _measure_time(args, device) -> dict:
    """Both configurations in the same processes, stepped in turn, so that a change in machine
    load affects both alike."""
    from mm_moe.model.moe.layer import MoELayer
    from mm_moe.trainer.step import train_step

    rank = int(os.environ["RANK"])
    engines = {ep: _build(args, ep, device) for ep in (1, 2)}
    samples = {f"{k}{ep}": [] for ep in engines for k in ("step_s", "layer_s", "all_to_all_s")}
    for step in range(args.steps + 2):
        batches = _batches(args, args.vocab, rank, step, args.accumulation)
        for ep, engine in engines.items():
            t = _timed(lambda e=engine, b=batches: train_step(e, b, 0.0, WORLD, device), device)
            if step >= 2:  # two warm-up steps
                samples[f"step_s{ep}"].append(t)
    for engine in engines.values():
        engine.module.zero_grad(set_to_none=True)
    layers = {
        ep: next(m for m in e.module.modules() if isinstance(m, MoELayer))
        for ep, e in engines.items()
    }
    runs = {ep: _layer_step(layer, args, device) for ep, layer in layers.items()}
    timer = layers[2].dispatcher.timer
    for i in range(args.steps + 2):
        for ep, run in runs.items():
            timer.enabled, timer.seconds = ep == 2, 0.0
            t = _timed(run, device)
            if i >= 2:
                samples[f"layer_s{ep}"].append(t)
                samples[f"all_to_all_s{ep}"].append(timer.seconds if ep == 2 else 0.0)
    timer.enabled = False
    return {k: statistics.median(v) for k, v in samples.items()}


def _measure_memory(args, ep_size: int, device, rss_before: int) -> dict:
    from mm_moe.trainer.step import train_step

    rank = int(os.environ["RANK"])
    engine = _build(args, ep_size, device)
    for step in range(2):
        train_step(
            engine, _batches(args, args.vocab, rank, step, args.accumulation), 0.0, WORLD, device
        )
    peak = _peak_bytes(device)
    return {
        f"peak_mem_bytes{ep_size}": peak,
        f"mem_growth_bytes{ep_size}": peak - rss_before if device.type == "cpu" else peak,
        f"expert_bytes{ep_size}": _expert_bytes(engine),
    }


def _worker(rank: int, args, phase: str, port: int, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from mm_moe.parallel.distributed import init_distributed, shutdown

    device = init_distributed(args.backend, 600, args.device).device
    import megatron.core.parallel_state  # noqa: F401 - EP=2 imports it: count it in both baselines

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_bytes()
    result = {}
    for one in phase.split(","):  # --smoke: every phase in one pair of processes
        if one == "time":
            result.update(_measure_time(args, device))
        else:
            result.update(_measure_memory(args, int(one[-1]), device, rss_before))
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, result)
    if rank == 0:
        queue.put(everyone)
    shutdown()


def _run(args, phase: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(args, phase, _free_port(), queue),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    per_rank = queue.get()
    # Per-rank figures: the slower rank's times, the larger rank's memory.
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512, help="hidden size of each expert")
    ap.add_argument("--experts", type=int, default=8, help="experts per modality group")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--smoke", action="store_true", help="the smallest model, 1 step")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.d_model, args.ffn, args.experts, args.layers = 1, 32, 64, 2, 1
        args.vocab, args.seq_len, args.micro_batch = 64, 16, 2
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        ap.error(f"--device cuda needs {WORLD} GPUs")
    args.backend = "nccl" if args.device == "cuda" else "gloo"
    return args


def _ratios(ep1: dict, ep2: dict) -> dict:
    return {
        "step_time_ep2_over_ep1": ep2["step_s"] / ep1["step_s"],
        "all_to_all_share_of_layer_time_ep2": ep2["all_to_all_s"] / ep2["layer_s"],
        "layer_time_ep2_over_ep1": ep2["layer_s"] / ep1["layer_s"],
        "peak_mem_per_rank_ep2_over_ep1": ep2["peak_mem_bytes"] / ep1["peak_mem_bytes"],
        "mem_growth_per_rank_ep2_over_ep1": ep2["mem_growth_bytes"] / ep1["mem_growth_bytes"],
        "expert_mem_per_rank_ep2_over_ep1": ep2["expert_bytes"] / ep1["expert_bytes"],
    }


def _print_table(args, ep1: dict, ep2: dict, ratios: dict) -> None:
    print(
        f"MoMa {args.experts} text + {args.experts} image experts, d={args.d_model}, "
        f"expert hidden={args.ffn}, {args.layers} layers, {args.micro_batch}x{args.seq_len} "
        f"tokens per rank, {WORLD} ranks ({args.backend}), ZeRO-{args.zero_stage}"
    )
    print(f"{'':32s}{'EP=1':>12s}{'EP=2':>12s}{'EP2/EP1':>10s}")
    rows = [
        ("step time (ms)", "step_s", 1e3),
        ("MoE layer fwd+bwd (ms)", "layer_s", 1e3),
        ("  all-to-all (ms)", "all_to_all_s", 1e3),
        ("peak memory (MiB)", "peak_mem_bytes", 1 / 2**20),
        ("  growth (MiB)", "mem_growth_bytes", 1 / 2**20),
        ("expert params+grads+Adam (MiB)", "expert_bytes", 1 / 2**20),
    ]
    for label, key, scale in rows:
        a, b = ep1[key] * scale, ep2[key] * scale
        ratio = f"{b / a:10.2f}" if a else f"{'-':>10s}"
        print(f"{label:32s}{a:12.2f}{b:12.2f}{ratio}")
    share = ratios["all_to_all_share_of_layer_time_ep2"]
    print(f"all-to-all share of the EP=2 MoE layer time: {share:.1%}")


def main() -> None:
    args = _parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    # Timing: one pair of processes steps both configurations in turn. Memory: one pair of
    # processes per configuration, so that each peak is its own.
    # --smoke runs the three in one pair (a test: the peaks then mean nothing).
    if args.smoke:
        figures = _run(args, "time,mem1,mem2")
    else:
        figures = {**_run(args, "time"), **_run(args, "mem1"), **_run(args, "mem2")}
    keys = ("step_s", "layer_s", "all_to_all_s", "peak_mem_bytes", "mem_growth_bytes")
    ep1 = {k: figures[f"{k}1"] for k in (*keys, "expert_bytes")}
    ep2 = {k: figures[f"{k}2"] for k in (*keys, "expert_bytes")}
    ratios = _ratios(ep1, ep2)
    if args.json:
        print(json.dumps({"config": vars(args), "ep1": ep1, "ep2": ep2, "ratios": ratios}))
        return
    _print_table(args, ep1, ep2, ratios)


if __name__ == "__main__":
    main()
