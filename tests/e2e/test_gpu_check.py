"""`scripts/gpu_check.py --device cpu --smoke`: every step of `make gpu-check` in miniature on
the CPU (the gpu tests that can run there, bench_moe.py, bench_attention.py, bench_step.py,
the short trainings eager and compiled), so that the command a GPU machine runs is one CI has
run; and its exit status is 0 only when every step's was."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

from tests.helpers import PYTHON, REPO, _env

STEPS = [
    "tests",
    "bench_moe",
    "bench_attention",
    "bench_step",
    "train_smoke_eager",
    "train_smoke_compiled",
]
STEP_CASES = {"dense", "moma_ec", "moma_tc", "mixed_ec8", "mot", "moma_mod"}


def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [PYTHON, "scripts/gpu_check.py", "--device", "cpu", "--smoke", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.exists() else {}
    failed = {k: v for k, v in report.items() if isinstance(v, dict) and v.get("exit") != 0}
    assert proc.returncode == 0, f"{proc.stdout}\n{json.dumps(failed, indent=1)[-6000:]}"
    assert [k for k in report if isinstance(report[k], dict)] == STEPS
    assert all(report[k]["exit"] == 0 for k in STEPS)
    counts = report["tests"]["counts"]
    assert counts["failures"] == counts["errors"] == 0 and counts["tests"] > counts["skipped"]
    moe = report["bench_moe"]["rows"]  # scripts/bench_moe.py
    assert {r["case"] for r in moe} >= {"E8_k2", "fine_grained_E32_k4"}
    assert all(r["tokens"] == 128 and r["ours_ms"] > 0 for r in moe)
    attention = report["bench_attention"]["rows"]  # scripts/bench_attention.py
    assert [(r["seq_len"], r["docs_per_row"]) for r in attention] == [(128, 4)]
    steps = report["bench_step"]["rows"]  # scripts/bench_step.py
    assert {r["case"] for r in steps} == STEP_CASES and {r["shape"] for r in steps} == {"tiny"}
    for r in steps:
        assert {"case", "shape", "ratio_vs_dense", "step_s"} <= set(r) and r["step_s"] > 0
        dense = next(d for d in steps if d["case"] == "dense")
        assert abs(r["ratio_vs_dense"] - r["step_s"] / dense["step_s"]) < 1e-9
    for name in ("train_smoke_eager", "train_smoke_compiled"):
        assert report[name]["tokens_per_s"] > 0
        # as the launchers: their default, unless the environment sets one
        want = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        assert report[name]["alloc_conf"] == want
        assert report[name]["kernels"]["attention"] == "sdpa"  # CPU: no FlexAttention backward


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_fails_when_any_step_fails(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    ran = []

    def step(name, code):
        return name, lambda: ran.append(name) or {"exit": code, "seconds": 0.0}

    out = tmp_path / "r.json"
    argv = ["gpu_check.py", "--device", "cpu", "--smoke", f"--out={out}"]
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(gpu_check, "_steps", lambda args: [step("a", 0), step("b", "timeout")])
    assert gpu_check.main() == 1 and ran == ["a", "b"]  # every step runs; one failed
    assert json.loads(out.read_text())["b"]["exit"] == "timeout"
    monkeypatch.setattr(gpu_check, "_steps", lambda args: [step("a", 0), step("b", 0)])
    assert gpu_check.main() == 0
