"""Step-time cost of the routing-health statistics (moe.health_stats) on the demo model:
forward + backward of one micro-batch with and without them, interleaved, in one process.

    .venv/bin/python scripts/bench_routing_health.py [--reps 40] [--batch 16]

Training computes them only on the steps it logs (every trainer.log_interval), so the cost per
training step is this ratio's excess divided by log_interval.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from mm_moe.cli import compose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(["experiment=demo"])
    vocab, seq = 2400, cfg.data.seq_len
    models = {}
    for health in (True, False):
        torch.manual_seed(0)
        models[health] = cfg.model.with_vocab(vocab).build(replace(cfg.moe, health_stats=health))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, seq), generator=g)
    modality = (torch.rand(args.batch, seq, generator=g) < 0.5).long()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.reps):
        for health, model in models.items():
            start = time.perf_counter()
            out = model.train()(ids, modality)
            losses = {**out.aux_losses, **out.aux_router_losses}
            (out.logits.float().mean() + sum(losses.values())).backward()
            model.zero_grad(set_to_none=True)
            times[health].append(time.perf_counter() - start)
    warm = args.reps // 5
    on, off = (statistics.median(times[h][warm:]) for h in (True, False))
    print(f"forward+backward, batch {args.batch}x{seq}, {args.threads} threads (median):")
    print(f"  with health statistics {1000 * on:.1f} ms, without {1000 * off:.1f} ms")
    print(f"  ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
