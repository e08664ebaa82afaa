"""`make gpu-check`: validate a GPU machine in one command (under 8 minutes on one H100/H200).

    .venv/bin/python scripts/gpu_check.py [--out runs/gpu_check.json] [--quick]

Runs, each with a time limit, and writes every result to one JSON file:
1. the `gpu` tests (single-GPU: the MoE layer in bf16 against the naive reference for every
   router with the grouped GEMM asserted on Hopper, FlexAttention forward and backward
   against SDPA, a forward without host syncs, a 20-step tiny MoMa run; with 2 or more GPUs
   also the expert-parallel NCCL tests);
2. `scripts/bench_moe.py --device cuda` and `scripts/bench_attention.py --device cuda`;
3. 50 steps of `model=moma_4t4i_1.4b` on one GPU (bf16, synthetic data, sequences of 4096),
   eager and with `trainer.compile=true`: tokens/s and MFU.

Without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = "timeout", (exc.stdout or b"").decode(errors="replace")
    return {
        "command": " ".join(cmd),
        "exit": code,
        "seconds": time.perf_counter() - t0,
        "tail": out[-3000:],
    }


def _tests(timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", f"--junitxml={xml}"]
        result = _run(cmd, timeout)
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
    return result


def _json_lines(result: dict) -> list[dict]:
    rows = []
    for line in result.pop("tail", "").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    result["rows"] = rows
    return rows


def _bench(script: str, timeout: int, *extra: str) -> dict:
    result = _run(
        [sys.executable, f"scripts/{script}", "--device", "cuda", "--json", *extra], timeout
    )
    tail = result.get("tail", "")
    if not _json_lines(result):
        result["tail"] = tail
    return result


def _train_1p4b(steps: int, compile_: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "mm_moe.train",
            "model=moma_4t4i_1.4b",
            "data=synthetic_patterns",
            "data.seq_len=4096",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=4",
            f"trainer.max_steps={steps}",
            "trainer.log_interval=1",
            "trainer.device=cuda",
            "trainer.precision=bf16",
            f"trainer.compile={str(compile_).lower()}",
            "checkpoint.interval=0",
            "eval=none",
            "logging.wandb.mode=disabled",
            "logging.progress=lines",
            f"trainer.run_dir={tmp}",
        ]
        result = _run(cmd, timeout)
        path = Path(tmp) / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            steady = rows[len(rows) // 2 :]  # after warm-up (and compilation)
            result["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
            result["mfu"] = statistics.median(r.get("mfu") or 0.0 for r in steady)
            result["step_time_s"] = statistics.median(r["step_time_s"] for r in steady)
            result["loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]]
            result["kernels"] = {k: rows[0].get(k) for k in ("attention", "moe/gemm")}
            result.pop("tail")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="tests and 10 training steps only")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to check")
        return 0
    report = {
        "device": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        ("tests", lambda: _tests(timeout=240)),
        ("train_moma_1.4b_eager", lambda: _train_1p4b(10 if args.quick else 50, False, 150)),
    ]
    if not args.quick:
        steps += [
            ("bench_moe", lambda: _bench("bench_moe.py", 90)),
            ("bench_attention", lambda: _bench("bench_attention.py", 90)),
            ("train_moma_1.4b_compiled", lambda: _train_1p4b(50, True, 180)),
        ]
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
