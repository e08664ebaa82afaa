"""The whole training step (forward, backward, optimizer step) of dense and each MoE preset,
measured in one process and one run: the step time of each model and its ratio to dense.

    .venv/bin/python scripts/bench_step.py [--json] [--device cuda] [--shapes tiny,mid]
        [--rounds 5] [--steps 10] [--cases dense,moma_ec,...] [--smoke]

Each case is the project's own training path: `build_training(cfg)` (the DeepSpeed engine,
the synthetic_patterns data, the default hooks: metrics every trainer.log_interval steps,
routing statistics on the steps that log them) and `Trainer.step` followed by the hooks, as
`Trainer.fit` runs them. Shapes: `tiny` is tiny_dense (d=128, 4 layers); `mid` is d=512,
8 layers, at the same sequence length (128) and batch (experiment=tiny_dense: 16 sequences in
micro-batches of 4). The cases of one shape are built together and stepped round robin
(`--steps` steps each per round, `--rounds` rounds), so that a change in machine load hits
every case alike; the first round is warm-up. `step_s` is the median wall time of one step
(its hooks included) over the other rounds, `ratio_vs_dense` the case's over dense's.

`--json` prints one JSON row per case: {case, shape, ratio_vs_dense, step_s, ...}.
`--smoke`: the tiny shape, batch 2 x 32 tokens, 2 rounds of 2 steps (a test runs it in
seconds; the figures mean nothing).
`--profile CASE`: after the timing, torch.profiler over `--steps` steps of CASE at the first
shape (its top 15 ops by self time, as in docs/benchmarks.md), and the aten ops that one of its
MoE layers runs, forward and backward, on a logged and an unlogged step.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from anywhere
    sys.path.insert(0, str(REPO))

# name -> Hydra overrides on experiment=tiny_dense; MoD's layers are filled in per shape.
CASES = {
    "dense": ["moe=none"],
    "moma_ec": ["moe=moma_4t4i_ec"],
    "moma_tc": ["moe=moma_4t4i_tc"],
    "mixed_ec8": ["moe=mixed8_ec"],
    "mot": ["moe=none", "model.untie=[ffn,attention,norms]"],
    "moma_mod": ["moe=moma_4t4i_ec", "model.mod.capacity=0.25"],
}
SHAPES = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 384},
    "mid": {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 1536},
}


def overrides(case: str, shape: str, args, run_dir: Path) -> list[str]:
    """The Hydra overrides of one (case, shape)."""
    dims = SHAPES[shape]
    out = ["experiment=tiny_dense", *CASES[case]]
    out += [f"model.{k}={v}" for k, v in dims.items()]
    if case == "moma_mod":  # every other block routed (the MoD paper's choice)
        out.append(f"model.mod.layers=[{','.join(map(str, range(1, dims['n_layers'], 2)))}]")
    out += [
        f"data.seq_len={args.seq_len}",
        f"trainer.global_batch_size={args.batch}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.max_steps={args.rounds * args.steps}",
        f"trainer.device={args.device}",
        f"trainer.run_dir={run_dir}",
        "trainer.peak_tflops=0",
        "checkpoint.interval=0",
        "eval=none",
        "logging.wandb.mode=disabled",
        "logging.progress=lines",
        "logging.level=WARNING",
    ]
    return out


class Run:
    """One built training run, stepped a few steps at a time (Trainer.fit's loop, in parts)."""

    def __init__(self, cfg):
        from mm_moe.trainer.build import build_training
        from mm_moe.trainer.trainer import Trainer

        self.trainer = Trainer(build_training(cfg))
        t = self.trainer.training
        t.metrics.first_row = dict(t.facts)
        for hook in self.trainer.hooks:
            hook.before_fit(self.trainer)
        self.step, self.times = t.start_step, []

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step += 1
            t0 = time.perf_counter()
            record = self.trainer.step(self.step)
            for hook in self.trainer.hooks:
                hook.after_step(self.trainer, self.step, record)
            self.times.append(time.perf_counter() - t0)

    def close(self) -> None:
        t = self.trainer.training
        t.checkpointer.close()
        for hook in self.trainer.hooks:
            hook.after_fit(self.trainer)
        t.metrics.close()


def bench_shape(shape: str, cases: list[str], args, tmp: Path) -> list[dict]:
    from mm_moe.cli import compose

    runs = {c: Run(compose(overrides(c, shape, args, tmp / f"{shape}_{c}"))) for c in cases}
    for _ in range(args.rounds):
        for run in runs.values():
            run.run(args.steps)
    warm = args.steps  # the first round: compilation, allocator and cache warm-up
    step_s = {c: statistics.median(run.times[warm:]) for c, run in runs.items()}
    for run in runs.values():
        run.close()
    runs.clear()
    gc.collect()
    return [
        {
            "case": c,
            "shape": shape,
            "ratio_vs_dense": step_s[c] / step_s["dense"],
            "step_s": step_s[c],
            "steps_timed": (args.rounds - 1) * args.steps,
            "device": args.device,
        }
        for c in cases
    ]


def profile_case(case: str, shape: str, args, tmp: Path) -> None:
    """Print the profiler's top ops of `args.steps` steps of one case, after a warm-up round."""
    from torch.profiler import ProfilerActivity, profile

    from mm_moe.cli import compose

    cfg = compose(overrides(case, shape, args, tmp / f"profile_{case}"))
    run = Run(cfg)
    run.run(args.steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.run(args.steps)
    run.close()
    print(f"# torch.profiler, {case} at {shape}, {args.steps} steps (self time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if cfg.moe.enabled:
        for logged in (True, False):
            counts = {
                first: moe_layer_ops(
                    cfg.moe, SHAPES[shape], args.micro_batch, args.seq_len, logged, first
                )
                for first in (False, True)
            }
            total, top = counts[False]
            print(f"# aten ops of one MoE layer, forward+backward, stats={logged}: {total}")
            print("  " + ", ".join(f"{name} {n}" for name, n in top))
            print(
                f"# the forward's first MoE layer, which also makes what every layer shares "
                f"(the token index, the expert ids), stats={logged}: {counts[True][0]}"
            )


def moe_layer_ops(moe, dims: dict, batch: int, seq_len: int, stats: bool, first: bool):
    """(total, 10 most frequent) aten ops of one MoE layer's forward and backward: a later
    layer of a forward, or (`first`) the forward's first, which makes what every layer of
    the forward shares (its ForwardContext's token index and cache)."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from mm_moe.model.context import ForwardContext
    from mm_moe.model.moe.layer import MoELayer

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = MoELayer(moe, dims["d_model"], dims["ffn_hidden"], 0).train()
    x_BSd = torch.randn(batch, seq_len, dims["d_model"], requires_grad=True)
    modality_BS = (torch.rand(batch, seq_len) < 0.5).long()
    for counting in (False, True):  # the first forward warms caches up
        ctx = ForwardContext.for_layer(modality_BS)
        ctx.collect_stats = stats
        if not first:  # an earlier layer of the same forward made the shared parts
            with torch.no_grad():
                layer(x_BSd, ctx)
            ctx.aux_losses.clear(), ctx.aux_router_losses.clear(), ctx.stats.clear()
        with Ops() if counting else _nothing() as ops:
            y_BSd = layer(x_BSd, ctx)
            losses = [*ctx.aux_losses.values(), *ctx.aux_router_losses.values()]
            (y_BSd.square().mean() + sum(losses, y_BSd.new_zeros(()))).backward()
    return sum(ops.count.values()), ops.count.most_common(10)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shapes", default="tiny,mid")
    p.add_argument("--cases", default=",".join(CASES), help="dense is always included")
    p.add_argument("--rounds", type=int, default=5, help="the first is warm-up")
    p.add_argument("--steps", type=int, default=10, help="steps per case per round")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 x 32 tokens, 2 x 2 steps")
    p.add_argument("--profile", metavar="CASE", help="profile CASE after the timing")
    args = p.parse_args()
    if args.smoke:
        args.shapes, args.seq_len, args.batch, args.micro_batch = "tiny", 32, 2, 2
        args.rounds, args.steps = 2, 2
    args.shape_list = [s for s in args.shapes.split(",") if s]
    args.case_list = ["dense"] + [c for c in args.cases.split(",") if c and c != "dense"]
    bad = [s for s in args.shape_list if s not in SHAPES] + [
        c for c in [*args.case_list, args.profile or "dense"] if c not in CASES
    ]
    if bad:
        p.error(f"unknown {bad}: shapes {', '.join(SHAPES)}; cases {', '.join(CASES)}")
    if args.rounds < 2 or args.steps < 1:
        p.error("--rounds must be at least 2 (the first is warm-up) and --steps at least 1")
    from mm_moe.utils.cuda_check import cuda_missing

    if args.device == "cuda" and (why := cuda_missing()):
        p.error(f"--device cuda: {why}; use --device cpu")
    return args


def main() -> None:
    args = _parse()
    logging.getLogger("mm_moe").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shape_list:
            for row in bench_shape(shape, args.case_list, args, Path(tmp)):
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
        if not args.json:
            print(f"{'case':<10} {'shape':<5} {'step_s':>9} {'vs dense':>9}")
            for r in rows:
                step_s, ratio = r["step_s"], r["ratio_vs_dense"]
                print(f"{r['case']:<10} {r['shape']:<5} {step_s:>9.4f} {ratio:>8.2f}x")
        if args.profile:
            profile_case(args.profile, args.shape_list[0], args, Path(tmp))


if __name__ == "__main__":
    main()
