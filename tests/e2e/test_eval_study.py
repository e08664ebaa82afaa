"""Evaluation during training (expert parallel: every rank evaluates in lockstep), cumulative
FLOPs across a resume, and scripts/study_moma.py end to end on tiny settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO, _env, metrics, train

EVAL = [
    "experiment=tiny_moma",
    "eval.interval=2",
    "eval.num_batches=2",
    "eval.micro_batch_size=2",
    "parallel.expert_parallel_size=2",
    "checkpoint.interval=2",
]


def _heldout_again(step_dir) -> dict:
    import torch

    from mm_moe import load_pretrained
    from mm_moe.eval.heldout import HeldoutEval, heldout_batches

    model = load_pretrained(step_dir)
    cfg = model.train_config
    micro = cfg.trainer.micro_batch_size
    batches = [
        b
        for rank in (0, 1)
        for b in heldout_batches(cfg.eval, cfg.data, cfg.tokenizer, rank, 2, micro)
    ]
    return HeldoutEval(batches, torch.device("cpu"))(model)


def test_eval_during_training_expert_parallel_and_flops_resume(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(full, *EVAL, "trainer.max_steps=4", nproc=2)
    rows = {r["step"]: r for r in metrics(full)}
    for step in (2, 4):
        for m in ("text", "image"):
            loss = rows[step][f"eval/loss_{m}"]
            assert rows[step][f"eval/ppl_{m}"] == pytest.approx(math.exp(loss))
    # Step 4's held-out losses recomputed on one process: the step-4 checkpoint on both ranks'
    # held-out batches (eval-mode routing is per token, so where a row sits does not matter).
    want = _heldout_again(full / "checkpoints" / "step_00000004")
    for key in ("eval/loss_text", "eval/loss_image", "eval/tokens_text", "eval/tokens_image"):
        assert rows[4][key] == pytest.approx(want[key], rel=1e-5), key
    assert "eval/loss_text" not in rows[1] and "eval/loss_text" not in rows[3]
    # cumulative FLOPs: each step's FLOPs (its batch's non-padding tokens of each modality x
    # that step's FLOPs per token, with the expert-choice pairs the step computed), summed
    assert sorted(rows) == [1, 2, 3, 4]
    total = sum(rows[s]["flops_step"] for s in rows)
    assert rows[4]["flops_cumulative"] == pytest.approx(total)
    per_modality = sum(rows[4][f"flops_cumulative_{m}"] for m in ("text", "image"))
    assert per_modality == pytest.approx(total)

    # stop after step 2, resume to 4: the same FLOPs count and held-out losses
    train(part, *EVAL, "trainer.max_steps=2", nproc=2)
    train(part, *EVAL, "trainer.max_steps=4", "checkpoint.resume=auto", nproc=2)
    resumed = {r["step"]: r for r in metrics(part)}
    assert resumed[4]["flops_cumulative"] == rows[4]["flops_cumulative"]
    for key in ("eval/loss_text", "eval/loss_image", "eval/train_routing/loss_image"):
        assert resumed[4][key] == pytest.approx(rows[4][key], rel=1e-5)


def test_study_script_end_to_end(tmp_path, demo_assets):
    tok_dir, _ = demo_assets
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "scripts/study_moma.py",
        f"--out={out}",
        "--tiny",
        "--steps=2",
        "--dense-steps=4",
        "--eval-interval=2",
        "--seeds=1",
        "--models=dense,moma",
        # The study corpus (the default), built by the study at its smallest, pretokenized
        # with the tokenizers the runs read.
        f"--corpus-dir={tmp_path / 'corpus'}",
        "--corpus-pairs=40",
        "--zero-shot=10",
        "--t2i-per-label=1",
        # As many micro-batches as the evaluation during training: the same rows of heldout/.
        "--heldout-batches=1",
        f"--override=eval.text_to_image.cache_dir={tmp_path / 'cache'}",
        "--override=eval.text_to_image.classifier_steps=20",
        f"--override=tokenizer.path={tok_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["pairs"] == 40 and manifest["pretokenized"]
    assert "Data: the study corpus" in (out / "study.md").read_text()
    table = (out / "study.md").read_text()
    assert "| dense |" in table and "| MoMa 4t4i |" in table
    assert "Routing health" in table and "| MoMa 4t4i | 0." in table  # its health row
    assert (out / "loss_vs_flops.png").stat().st_size > 1000
    assert (out / "routing_health.png").stat().st_size > 1000 and "routing_health.png" in table
    import csv

    lines = (out / "study.csv").read_text().splitlines()
    rows = {r["model"]: r for r in csv.DictReader(lines)}
    # dense seed 0 is a prefix of the long dense run (same data, init and schedule)
    assert float(rows["dense"]["savings_text_mean"]) == pytest.approx(1.0)
    assert float(rows["dense"]["savings_image_mean"]) == pytest.approx(1.0)
    assert set(rows) == {"dense", "moma"}
    assert float(rows["dense"]["step_time_vs_dense"]) == pytest.approx(1.0)
    # Routing health recounted from the MoMa run's last metrics row with it (mean over layers).
    key = "moe/l0/image/taken_0"
    logs = [p.parent for p in (out / "runs").glob("*/metrics.jsonl")]
    runs = [p for p in logs if any(key in r for r in metrics(p))]
    assert len(logs) == 3 and len(runs) == 1
    last = [r for r in metrics(runs[0]) if key in r][-1]
    shares = [v for k, v in last.items() if k.startswith("moe/l") and k.endswith("/image/taken_0")]
    assert len(shares) >= 2
    want = sum(shares) / len(shares)
    assert float(rows["moma"]["taken_0_image_mean"]) == pytest.approx(want, rel=1e-9)
    assert math.isnan(float(rows["dense"]["taken_0_image_mean"]))
    # The whole held-out sets scored after training: heldout/ at the evaluation's size gives
    # the final evaluation during training again; heldout_deformed/ holds other images.
    assert "heldout_deformed: image vs dense" in table
    first_tokens = {}
    for run in logs:
        whole = json.loads((run / "evals.json").read_text())["heldout_sets"]
        final = [r for r in metrics(run) if "eval/loss_image" in r][-1]
        for key in ("loss_image", "loss_text", "train_routing_loss_image", "tokens_image"):
            logged = final["eval/" + key.replace("train_routing_", "train_routing/")]
            assert whole["heldout"][key] == pytest.approx(logged, rel=1e-6), key
        assert whole["heldout_deformed"]["loss_image"] != whole["heldout"]["loss_image"]
        first_tokens[run] = whole["heldout"]["tokens_image"]

    # Run again: every run is found by its overrides and reused, none retrained.
    logs = {p: p.stat().st_mtime for p in (out / "runs").glob("*/train.log")}
    assert len(logs) == 3  # the long dense run, dense and MoMa seed 0
    # Speed settings (the image cache, the fused AdamW) do not change what a run trains; other
    # sampling settings re-evaluate the finished runs without training them again.
    cmd += ["--override=data.image_cache_size=7", "--override=optim.fused=false"]
    cmd += ["--override=eval.text_to_image.temperature=0.5", "--heldout-batches=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/train.log")} == logs
    for log in logs:
        evals = json.loads((log.parent / "evals.json").read_text())
        assert evals["multimodal_settings"]["text_to_image"]["temperature"] == 0.5
        assert evals["heldout_settings"]["num_batches"] == 2
        assert evals["heldout_sets"]["heldout"]["tokens_image"] > first_tokens[log.parent]

    # Longer runs on the same schedule (--dense-steps unchanged): MoMa continues its finished
    # 2-step run from that run's last checkpoint; dense seed 0 at 4 steps is the long dense run.
    short = next(p for p in logs if p.parent.name.startswith("moma_s0_2_")).parent
    cmd = [c for c in cmd if not c.startswith("--steps=")] + ["--steps=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"moma seed 0: continues {short.name}" in proc.stdout
    longer = next((out / "runs").glob("moma_s0_4_*"))
    assert json.loads((longer / "evals.json").read_text())["continued_from"] == short.name
    rows = metrics(longer)
    assert [r["step"] for r in rows if "eval/loss_image" in r] == [2, 4]
    assert rows[: len(metrics(short))] == metrics(short)
    assert len(list((out / "runs").glob("*/train.log"))) == 4  # no dense run trained again
