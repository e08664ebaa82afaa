"""How long training blocks on a checkpoint: asynchronous (checkpoint.async=true: stage to CPU
memory, write in the background) against synchronous, measured in one run.

    python scripts/bench_checkpoint.py [d_model=256] [n_layers=8] [repeats=3] [dir=/tmp/...]

One process, the real DeepSpeed engine (ZeRO-0, fp32, CPU), a dense model of tens of MB plus its
Adam moments. Prints the checkpoint size, the median blocking time of each mode and their ratio.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _args() -> dict:
    args = {"d_model": 256, "n_layers": 8, "repeats": 3, "dir": ""}
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        raise SystemExit(0)
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        if key not in args:
            raise SystemExit(f"unknown argument {key!r}; valid: {', '.join(args)}")
        args[key] = type(args[key])(value)
    return args


def main() -> None:
    from mm_moe.checkpoint.async_save import Checkpointer
    from mm_moe.config import TrainConfig, from_dict
    from mm_moe.parallel.distributed import shutdown
    from mm_moe.trainer.build import build_training
    from mm_moe.trainer.step import train_step

    args = _args()
    root = Path(args["dir"] or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    cfg = from_dict(
        TrainConfig,
        {
            "model": {"d_model": args["d_model"], "n_layers": args["n_layers"], "n_heads": 4},
            "data": {"seq_len": 64},
            "trainer": {"global_batch_size": 2, "micro_batch_size": 2, "run_dir": str(root)},
            "parallel": {"backend": "gloo"},
            "logging": {"wandb": {"mode": "disabled"}},
        },
    )
    training = build_training(cfg)  # the run as training builds it: DeepSpeed, ZeRO-0, fp32
    engine, device = training.engine, training.dist.device
    train_step(engine, training.loader.next(), 0.0, 1, device)  # Adam moments exist

    blocking = {}
    for mode in ("sync", "async"):
        training.cfg.checkpoint.async_save = mode == "async"
        training.cfg.checkpoint.keep_last = 1
        checkpointer = Checkpointer(training.cfg.checkpoint, device)
        times = []
        for i in range(args["repeats"]):
            step = 1000 * (mode == "async") + i + 1
            t0 = time.perf_counter()
            checkpointer.save(training.state(step))
            times.append(time.perf_counter() - t0)
            checkpointer.wait()  # not timed: the background write, before the next save
        blocking[mode] = statistics.median(times)
    size = sum(f.stat().st_size for f in checkpointer.root.glob("step_*/*"))
    n_params = sum(p.numel() for p in engine.module.parameters())
    print(
        f"model: {n_params / 1e6:.1f}M parameters; checkpoint {size / 1e6:.0f} MB "
        f"(model + Adam moments)"
    )
    print(f"sync save (blocks for the whole write): {blocking['sync'] * 1e3:.0f} ms")
    print(f"async save (blocks while staging to CPU memory): {blocking['async'] * 1e3:.0f} ms")
    print(f"async blocking / sync save: {blocking['async'] / blocking['sync']:.3f}")
    training.metrics.close()
    if not args["dir"]:
        shutil.rmtree(root)
    shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
