"""`make gpu-check`: validate a GPU machine in one command (about 8 minutes on one H100/H200;
each step's time limit leaves room for first compiles).

    .venv/bin/python scripts/gpu_check.py [--out runs/gpu_check.json] [--quick]
    .venv/bin/python scripts/gpu_check.py --device cpu --smoke --out FILE   # CI: in miniature

Runs, each with a time limit, and writes every result to one JSON file:
1. the `gpu` tests (single-GPU: the MoE layer in bf16 against the naive reference for every
   router with the grouped GEMM asserted on Hopper, FlexAttention forward and backward
   against SDPA, a forward without host syncs, a 20-step tiny MoMa run; with 2 or more GPUs
   also the expert-parallel NCCL tests);
2. `scripts/bench_moe.py`, `scripts/bench_attention.py` and `scripts/bench_step.py` on the
   device;
3. 50 steps of `model=moma_4t4i_1.4b` on one GPU (bf16, synthetic data, sequences of 4096),
   eager and with `trainer.compile=true`: tokens/s and MFU.

`--smoke` runs every step in miniature (the benchmarks' `--smoke`, a 2-layer tiny MoMa for a
few steps instead of the 1.4B); with `--device cpu` the gpu tests that can run on a CPU
(tests/gpu/device.py) run there. So the command a GPU machine runs is one CI has run.

Where `nvidia-smi -L` lists GPUs but torch cannot use them (a CPU-only torch:
`torch.version.cuda` is None, or no device visible), it says so in one line and exits 1.
Without GPUs (and `--device cuda`) it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# The launchers' allocator setting (launch/torchrun.sh, launch/slurm.sbatch), so that memory and
# speed are measured as real runs have them; a value in the environment wins, as there.
ALLOC_CONF = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    """One step of the check in its own process group: on a timeout the whole group goes
    (the ranks a test or torchrun started would hold GPU memory through every later step),
    and both streams' tails are kept (mm_moe.train logs to stderr)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF, **(env or {})}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        code = "timeout"
    out = (stdout or "") + (stderr or "")
    return {
        "command": " ".join(cmd),
        "alloc_conf": env["PYTORCH_CUDA_ALLOC_CONF"],
        "exit": code,
        "seconds": time.perf_counter() - t0,
        "tail": out[-3000:],
    }


def _tests(timeout: int, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", f"--junitxml={xml}"]
        cmd += ["-p", "no:cacheprovider", "-p", "no:xdist"]
        result = _run(cmd, timeout, env)
        if xml.exists():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            result["counts"] = {
                k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
            }
            result["failed"] = [
                f"{case.get('classname')}::{case.get('name')}"
                for case in suite.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None
            ]
            if result["exit"] == 0 and result["counts"]["tests"] <= result["counts"]["skipped"]:
                result["exit"] = "no test ran"  # every test skipped: nothing was checked
    return result


def _json_lines(result: dict) -> list[dict]:
    rows = []
    for line in result.pop("tail", "").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    result["rows"] = rows
    return rows


def _bench(script: str, device: str, timeout: int, *extra: str) -> dict:
    result = _run(
        [sys.executable, f"scripts/{script}", "--device", device, "--json", *extra], timeout
    )
    tail = result.get("tail", "")
    if not _json_lines(result):
        result["tail"] = tail
    return result


# The 1.4B MoMa at the gpu-check size, and its miniature (--smoke): 2 tiny MoMa layers.
FULL_RUN = [
    "model=moma_4t4i_1.4b",
    "data=synthetic_patterns",
    "data.seq_len=4096",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=4",
    "trainer.precision=bf16",
]
SMOKE_RUN = [
    "experiment=tiny_moma",
    "model.n_layers=2",
    "data.seq_len=32",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=2",
]


def _train(run: list[str], device: str, steps: int, compile_: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "mm_moe.train",
            *run,
            f"trainer.max_steps={steps}",
            "trainer.log_interval=1",
            f"trainer.device={device}",
            f"trainer.compile={str(compile_).lower()}",
            "checkpoint.interval=0",
            "eval=none",
            "logging.wandb.mode=disabled",
            "logging.progress=lines",
            f"trainer.run_dir={tmp}",
        ]
        result = _run(cmd, timeout)
        path = Path(tmp) / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if rows:  # a run that failed before its first logged step has none
            steady = rows[len(rows) // 2 :]  # after warm-up (and compilation)
            result["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
            result["mfu"] = statistics.median(r.get("mfu") or 0.0 for r in steady)
            result["step_time_s"] = statistics.median(r["step_time_s"] for r in steady)
            result["loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]]
            result["kernels"] = {k: rows[0].get(k) for k in ("attention", "moe/gemm")}
            if result["exit"] == 0:
                result.pop("tail")
    return result


def listed_gpus() -> int:
    """GPUs that `nvidia-smi -L` lists (0 without the tool or a driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def cuda_problem(torch) -> str | None:
    """Why this torch cannot use the GPUs that nvidia-smi lists; None when it can or when none
    are listed."""
    gpus = listed_gpus()
    if not gpus:
        return None
    if torch.version.cuda is None:
        return (
            f"nvidia-smi lists {gpus} GPU(s) but torch {torch.__version__} is a CPU-only build "
            "(torch.version.cuda is None): run `make setup`, which replaces it in .venv with "
            "torch==2.13.0 built for CUDA"
        )
    if not torch.cuda.is_available():
        return (
            f"nvidia-smi lists {gpus} GPU(s) but torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}) sees none: check the driver and CUDA_VISIBLE_DEVICES"
        )
    return None


# Time limits in seconds. The first run compiles: FlexAttention per shape (bench_attention,
# the tests), the 1.4B blocks with trainer.compile (minutes on a cold cache), Triton kernels of
# every first call; a limit only catches a hang, so each leaves a wide margin over the
# expected time (H100: tests ~2 min, trainings ~1 min eager and ~3 compiled, benches ~1 each).
LIMITS_S = {
    "tests": 900,
    "train_moma_1.4b_eager": 420,
    "bench_moe": 300,
    "bench_attention": 420,
    "bench_step": 600,
    "train_moma_1.4b_compiled": 900,
}
SMOKE_LIMIT_S = 600  # each step of --smoke (CI's 2 cores, inductor compiling on them)


def _steps(args) -> list[tuple[str, object]]:
    """(name, run) of every step, in order, at the requested size."""
    dev, lim = args.device, LIMITS_S
    env = {"MM_MOE_GPU_TESTS_DEVICE": dev}
    if args.smoke:
        smoke = SMOKE_LIMIT_S
        return [
            ("tests", lambda: _tests(timeout=smoke, env=env)),
            ("bench_moe", lambda: _bench("bench_moe.py", dev, smoke, "--smoke")),
            ("bench_attention", lambda: _bench("bench_attention.py", dev, smoke, "--smoke")),
            ("bench_step", lambda: _bench("bench_step.py", dev, smoke, "--smoke")),
            ("train_smoke_eager", lambda: _train(SMOKE_RUN, dev, 3, False, smoke)),
            ("train_smoke_compiled", lambda: _train(SMOKE_RUN, dev, 3, True, smoke)),
        ]
    steps = [
        ("tests", lambda: _tests(timeout=lim["tests"], env=env)),
        (
            "train_moma_1.4b_eager",
            lambda: _train(
                FULL_RUN, dev, 10 if args.quick else 50, False, lim["train_moma_1.4b_eager"]
            ),
        ),
    ]
    if not args.quick:
        steps += [
            ("bench_moe", lambda: _bench("bench_moe.py", dev, lim["bench_moe"])),
            ("bench_attention", lambda: _bench("bench_attention.py", dev, lim["bench_attention"])),
            ("bench_step", lambda: _bench("bench_step.py", dev, lim["bench_step"])),
            (
                "train_moma_1.4b_compiled",
                lambda: _train(FULL_RUN, dev, 50, True, lim["train_moma_1.4b_compiled"]),
            ),
        ]
    return steps


def _device_facts(torch, device: str) -> dict:
    if device == "cpu":
        return {"device": "cpu", "gpus": 0, "torch": torch.__version__}
    return {
        "device": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="tests and 10 training steps only")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true", help="every step in miniature (CI)")
    args = parser.parse_args()
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs the check in miniature only: add --smoke")
    import torch

    if args.device == "cuda":
        problem = cuda_problem(torch)
        if problem:
            print(f"gpu-check: {problem}")
            return 1
        if not torch.cuda.is_available():
            print(f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to check")
            return 0
    report = _device_facts(torch, args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = _steps(args)
    for name, fn in steps:
        print(f"gpu-check: {name} ...", flush=True)
        report[name] = fn()
        out.write_text(json.dumps(report, indent=1))  # what finished survives a later timeout
        print(f"gpu-check: {name}: exit {report[name]['exit']} in {report[name]['seconds']:.0f} s")
    print(f"gpu-check: results in {out}")
    ok = all(report[name]["exit"] == 0 for name, _ in steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
