"""The MoMa study's pieces (mm_moe/eval/study/): planning and run digests, reusing finished
runs, the savings factor and summaries, the tables and the figures."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from mm_moe.config import TrainConfig
from mm_moe.eval.study import markdown, plot, run, summarise
from mm_moe.eval.study.plan import Corpus, Planner, check_args, config_digest, corpus_for

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "study_dense_config.json"


def _args(*argv: str) -> argparse.Namespace:
    spec = importlib.util.spec_from_file_location("study_moma", REPO / "scripts" / "study_moma.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script._args(list(argv))


def test_config_digest_is_the_one_finished_runs_were_named_by():
    # The composed config of the default study's dense seed-0 run (asdict of TrainConfig at
    # fb7f051) and the digests scripts/study_moma.py's _config_digest gave it there, before the
    # study became a package: on a checkout without data/demo/corpus.json and
    # tokenizers/demo/metrics.json, and with these two texts as their content.
    built = ['{"pairs": 7257}\n', '{"psnr_db": 20.5}\n']
    assert config_digest(json.loads(FIXTURE.read_text()), []) == "1195206f"
    assert config_digest(json.loads(FIXTURE.read_text()), built) == "75a611a7"
    # What does not change the trained model does not change the digest.
    cfg = json.loads(FIXTURE.read_text())
    cfg["optim"]["fused"] = not cfg["optim"]["fused"]
    cfg["eval"]["text_to_image"]["temperature"] = 0.123
    cfg["checkpoint"]["interval"] = 7
    assert config_digest(cfg, []) == "1195206f"
    cfg = json.loads(FIXTURE.read_text())
    cfg["optim"]["lr"] = 1e-4
    assert config_digest(cfg, []) != "1195206f"


def test_todays_schema_digests_the_dense_run_as_before():
    """Composed with today's schema (keys added since, peak_flops renamed), the dense seed-0
    run of the demo-corpus study keeps the digest its finished run was named by."""
    from dataclasses import asdict

    from mm_moe.cli import compose

    args = _args("--corpus=demo")
    planner = Planner(args, None, corpus_for(args, REPO, "python"))
    composed = asdict(compose(planner.overrides("dense", 0, args.steps, Path("RUN"))))
    assert config_digest(composed, []) == "1195206f"
    composed = asdict(compose(planner.overrides("dense", 0, args.steps, Path("RUN"))))
    composed["trainer"]["activation_checkpointing"] = "full"
    composed["tokenizer"]["allow_changed"] = True
    assert config_digest(composed, []) != "1195206f"


def test_the_straight_through_top1_gate_is_another_run_only_where_it_acts():
    """Token choice top-1 renormalized (the TC arm): true trains another run than the first
    runs (constant gates, false); for expert choice the key changes nothing: the same run."""
    from dataclasses import asdict

    from mm_moe.cli import compose

    args = _args("--corpus=demo")
    planner = Planner(args, None, corpus_for(args, REPO, "python"))

    def digest(name: str, straight: bool, drop: bool = False) -> str:
        composed = asdict(compose(planner.overrides(name, 0, args.steps, Path("RUN"))))
        composed["moe"]["top1_straight_through"] = straight
        if drop:  # a config from before the key
            del composed["moe"]["top1_straight_through"]
        return config_digest(composed, [])

    assert digest("moma_tc", True) != digest("moma_tc", False) == digest("moma_tc", True, True)
    assert digest("moma", True) == digest("moma", False) == digest("moma", True, True)


def test_demo_corpus_overrides_are_the_ones_before_the_option():
    args = _args("--corpus=demo")
    planner = Planner(args, None, corpus_for(args, REPO, "python"))
    found = planner.overrides("dense", 0, args.steps, Path("RUN"))
    assert found == [
        *("experiment=demo", "eval=demo", "moe.gemm=loop", "trainer.global_batch_size=16"),
        *("trainer.micro_batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=30"),
        *("model=tiny_dense", "moe=none", "trainer.max_steps=1500", "trainer.seed=0"),
        *("trainer.log_interval=100", "eval.interval=100", "optim.decay_steps=2970"),
        *("checkpoint.interval=250", "checkpoint.keep_last=1", "checkpoint.resume=auto"),
        *("checkpoint.overwrite=true", "logging.wandb.mode=disabled", "logging.progress=lines"),
        "trainer.run_dir=RUN",
    ]


def test_the_demo_corpus_scores_the_heldout_set_the_runs_evaluate_on(tmp_path):
    """--override eval.sources=... (a demo corpus built elsewhere) was honoured in training
    but the whole-set scoring after it read the repository's data/demo/heldout, failing after
    every run had trained; a missing held-out set is now named before any run trains."""
    from mm_moe.errors import UserError
    from mm_moe.eval.study.plan import check_heldout

    elsewhere = tmp_path / "demo" / "heldout"
    args = _args("--corpus=demo", f"--override=eval.sources=[{{urls:{elsewhere},format:pairs}}]")
    corpus = corpus_for(args, REPO, "python")
    assert corpus.heldout == {"heldout": elsewhere}
    with pytest.raises(UserError, match=rf"held-out set 'heldout'.*{elsewhere} does not exist"):
        check_heldout(corpus)
    assert corpus_for(_args("--corpus=demo"), REPO, "python").heldout == {
        "heldout": REPO / "data" / "demo" / "heldout"
    }


def test_study_corpus_reads_its_shards_and_is_built_where_missing(tmp_path):
    args = _args(f"--corpus-dir={tmp_path}", "--corpus-pairs=300", "--override=optim.lr=1e-3")
    assert args.corpus == "study"
    corpus = corpus_for(args, REPO, "python")
    assert corpus.build_cmd[1:] == [
        str(REPO / "data_pipelines" / "build_study_corpus.py"),
        f"output={tmp_path}",
        "pairs=300",
        "seed=0",
        f"tokenizers={REPO / 'tokenizers' / 'demo'}",  # the runs' tokenizers pretokenize it
    ]
    other = _args(f"--corpus-dir={tmp_path}", "--override=tokenizer.path=/elsewhere/tok")
    assert corpus_for(other, REPO, "python").build_cmd[-1] == "tokenizers=/elsewhere/tok"
    assert corpus.overrides == [
        f"data.sources=[{{urls:{tmp_path / 'pairs'},format:pairs,weight:1}}]",
        f"eval.sources=[{{urls:{tmp_path / 'heldout'},format:pairs,weight:1}}]",
    ]
    (tmp_path / "pairs_tokens").mkdir()
    assert corpus_for(args, REPO, "python").overrides == corpus.overrides  # no shards in it
    (tmp_path / "pairs_tokens" / "pairs-000000.tar").touch()  # pretokenized: no VQ encoding
    corpus = corpus_for(args, REPO, "python")
    assert "pairs_tokens,format:tokens" in corpus.overrides[0]
    found = Planner(args, None, corpus).overrides("moma", 1, 10, Path("R"))
    # after the base settings (experiment=demo sets data=demo); presets and --override win
    assert found.index(corpus.overrides[0]) == 7 and found[-1] == "optim.lr=1e-3"
    assert corpus.built[0] == tmp_path / "manifest.json" == corpus.ready
    assert corpus.expected == {"pairs": 300, "seed": 0}


def test_check_args_names_what_cannot_make_a_study():
    def error(*argv):
        ns = argparse.Namespace(
            scale="cpu", models="dense,moma", seeds=1, steps=10, eval_interval=5, dense_steps=0
        )
        for a in argv:
            setattr(ns, *a)
        return check_args(ns), ns

    message, args = error()
    assert message is None and args.dense_steps == 20 and args.model_list == ["dense", "moma"]
    assert "unknown ['nope']" in error(("models", "dense,nope"))[0]
    assert "must include dense" in error(("models", "moma"))[0]
    assert "--dense-steps must be >= --steps" in error(("dense_steps", 5))[0]
    assert error(("models", "routing"))[1].model_list[:3] == ["dense", "moma", "moma_tc"]
    for key in ("jobs", "nproc"):  # --jobs 0 divided by zero; --nproc 0 started a study
        assert "--jobs and --nproc must be >= 1" in error((key, 0))[0]


def test_run_digests_follow_what_trains():
    from mm_moe.cli import compose

    def run_dir(*override):
        args = _args("--corpus=demo", "--tiny", *(f"--override={o}" for o in override))
        planner = Planner(args, compose, Corpus("demo"))
        return planner.run_dir("moma", 0, args.steps).name

    plain = run_dir()
    assert plain.startswith("moma_s0_1500_")
    assert run_dir("optim.fused=false", "eval.text_to_image.temperature=0.5") == plain
    assert run_dir("optim.lr=1e-3") != plain


def test_moe_overrides_label_the_runs_and_an_arm_they_break_is_named(tmp_path):
    """--moe-override changes every model with experts: the tables label those runs with it,
    study.md's header names it, and an arm it breaks (mixed8 cannot take modality groups) is
    a one-line error naming the arm."""
    from mm_moe.cli import compose
    from mm_moe.errors import UserError
    from mm_moe.eval.study.plan import label

    odd = ["moe.experts_per_modality.text=3", "moe.experts_per_modality.image=5"]
    args = _args("--corpus=demo", "--tiny", *(f"--moe-override={o}" for o in odd))
    assert label(args, "moma") == f"MoMa 4t4i ({', '.join(odd)})"
    assert label(args, "dense") == "dense" and label(args, "mot") == "MoT"
    assert f"--moe-override (runs with experts): {' '.join(odd)}" in "\n".join(
        markdown._header(args)
    )
    planner = Planner(args, compose, Corpus("demo"))
    assert planner.run_dir("moma", 0, args.steps).name.startswith("moma_s0_")
    with pytest.raises(UserError, match=r"^model mixed8 \(--moe-override applies to every"):
        planner.run_dir("mixed8", 0, args.steps)


def _fake_planner(tmp_path) -> Planner:
    """Every run composes to the default TrainConfig (no Hydra)."""
    args = _args("--corpus=demo", f"--out={tmp_path}", "--no-multimodal", "--seeds=1")
    return Planner(args, lambda overrides: TrainConfig(), Corpus("demo"))


def test_a_finished_run_is_reused_and_a_shorter_one_trained_again(tmp_path, monkeypatch):
    planner = _fake_planner(tmp_path)
    run_dir = planner.run_dir("dense", 0, 1500)
    run_dir.mkdir(parents=True)
    (run_dir / "evals.json").write_text(json.dumps({"steps": 1500, "train_s": 3.0}))
    trained = []

    def fake_run(cmd, **kwargs):
        trained.append(cmd)
        raise RuntimeError("trained")

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    assert run.train_and_eval(planner, "dense", 0, 1500, REPO)["train_s"] == 3.0
    assert not trained
    (run_dir / "evals.json").write_text(json.dumps({"steps": 100, "train_s": 3.0}))
    with pytest.raises(RuntimeError, match="trained"):
        run.train_and_eval(planner, "dense", 0, 1500, REPO)
    assert trained[0][1:3] == ["-m", "mm_moe.train"]
    assert f"trainer.run_dir={run_dir}" in trained[0]


def _finished_run(run_dir: Path, steps: int, last_checkpoint: int) -> None:
    """A finished run as training and the study leave it: evals.json, metrics rows and its
    last checkpoint (meta.json written last, the `latest` pointer)."""
    from mm_moe.checkpoint import layout

    run_dir.mkdir(parents=True)
    (run_dir / "evals.json").write_text(json.dumps({"steps": steps, "train_s": 1.0}))
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    tmp = layout.new_tmp_dir(run_dir / "checkpoints", last_checkpoint)
    (tmp / "model.pt").write_bytes(b"weights")
    (tmp / "meta.json").write_text(json.dumps({"step": last_checkpoint}))
    layout.publish(run_dir / "checkpoints", tmp, last_checkpoint)


def test_a_longer_run_continues_a_finished_shorter_one(tmp_path, monkeypatch):
    """A run that is a finished shorter run continued (the same config up to
    trainer.max_steps, the schedule fixed by optim.decay_steps) starts from its last
    checkpoint, linked, with its metrics rows; training then resumes there."""
    cfg = TrainConfig()
    cfg.optim.decay_steps = 10
    args = _args("--corpus=demo", f"--out={tmp_path}", "--no-multimodal", "--seeds=1")
    planner = Planner(args, lambda overrides: cfg, Corpus("demo"))
    short = planner.run_dir("moma", 0, 4)
    _finished_run(short, 4, last_checkpoint=4)
    _finished_run(planner.run_dir("moma", 0, 2), 2, last_checkpoint=2)
    _finished_run(planner.run_dir("mot", 0, 4), 4, last_checkpoint=4)  # another model
    assert run.continued_from(planner, "moma", 0, 8) == short  # the longest shorter one
    assert run.continued_from(planner, "moma", 0, 4) is None  # trained already
    assert run.continued_from(planner, "moma", 1, 8) is None  # another seed

    commands = []

    def fake_train(cmd, **kwargs):
        commands.append(cmd)
        return argparse.Namespace(returncode=0)

    monkeypatch.setattr(run.subprocess, "run", fake_train)
    done = run.train_and_eval(planner, "moma", 0, 8, REPO, short)
    longer = planner.run_dir("moma", 0, 8)
    assert done["continued_from"] == short.name and len(commands) == 1
    assert "checkpoint.resume=auto" in commands[0] and "trainer.max_steps=8" in commands[0]
    weights = Path("checkpoints") / "step_00000004" / "model.pt"
    assert (longer / weights).stat().st_ino == (short / weights).stat().st_ino  # linked
    assert (longer / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (longer / "metrics.jsonl").read_text() == (short / "metrics.jsonl").read_text()
    # Started already (its own checkpoints, a resume): it continues itself, not a prefix.
    assert run.continued_from(planner, "moma", 0, 8) is None

    # A shorter run whose last checkpoint is not its final step, or a schedule that follows
    # max_steps (decay_steps 0), is not a prefix.
    _finished_run(planner.run_dir("mot", 1, 4), 4, last_checkpoint=3)
    assert run.continued_from(planner, "mot", 1, 8) is None
    assert run.continued_from(planner, "mot", 0, 8) == planner.run_dir("mot", 0, 4)
    cfg.optim.decay_steps = 0
    follows = Planner(args, lambda overrides: cfg, Corpus("demo"))
    _finished_run(follows.run_dir("mot", 0, 4), 4, last_checkpoint=4)
    assert run.continued_from(follows, "mot", 0, 8) is None


def test_savings_interpolation():
    curve = [
        {"flops_cumulative_text": 10.0, "eval/loss_text": 4.0},
        {"flops_cumulative_text": 100.0, "eval/loss_text": 3.0},
        {"flops_cumulative_text": 1000.0, "eval/loss_text": 3.5},  # noisy: running minimum
        {"flops_cumulative_text": 10000.0, "eval/loss_text": 2.0},
    ]
    flops_needed = summarise.flops_needed
    assert flops_needed(curve, "text", 3.0) == (pytest.approx(100.0), "")
    assert flops_needed(curve, "text", 3.5)[0] == pytest.approx(math.sqrt(10 * 100))
    assert flops_needed(curve, "text", 2.5)[0] == pytest.approx(math.sqrt(1e3 * 1e4))
    assert flops_needed(curve, "text", 1.0) == (10000.0, ">")
    assert flops_needed(curve, "text", 5.0) == (10.0, "<")


def _write_run(run_dir: Path, losses: list[float], flops: float, taken: float | None) -> Path:
    """A metrics.jsonl like training writes: eval rows and logged steps with routing health."""
    run_dir.mkdir(parents=True)
    rows = []
    for i, loss in enumerate(losses, 1):
        row = {"step": 10 * i, "step_time_s": 0.1 * (1 + (taken is not None))}
        for m in ("text", "image"):
            row |= {f"eval/loss_{m}": loss, f"eval/train_routing/loss_{m}": loss + 0.01}
            row[f"flops_cumulative_{m}"] = flops * i
            if taken is not None:
                row |= {f"moe/l{layer}/{m}/taken_0": taken + 0.1 * layer for layer in (0, 1)}
        rows.append(row | {"flops_cumulative": 2 * flops * i})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return run_dir


def _summary(tmp_path):
    dense = _write_run(tmp_path / "dense", [4.0, 3.0, 2.0, 1.5], 100.0, None)
    curve = summarise.eval_curve(dense)
    rows = [summarise.run_row("dense", 0, dense, {"train_s": 1.0}, curve)]
    for seed, final in enumerate((2.0, 3.0)):
        moma = _write_run(tmp_path / f"moma{seed}", [4.0, final], 100.0, 0.5)
        rows.append(summarise.run_row("moma", seed, moma, {"train_s": 1.0}, curve))
    labels = {"dense": "dense", "moma": "MoMa 4t4i"}
    fpt = {"dense": {"text": 2.0, "image": 2.0}, "moma": {"text": 2.0, "image": 1.0}}
    return rows, summarise.summarize(rows, labels, fpt), curve


def test_rows_and_summary(tmp_path):
    rows, summary, _ = _summary(tmp_path)
    dense, moma = summary
    assert rows[0]["savings_text"] == pytest.approx(1.0) and rows[0]["loss_text"] == 1.5
    # MoMa reached 2.0 (dense: at 300 FLOPs) and 3.0 (dense: at 200) with 200 FLOPs each
    assert [r["savings_image"] for r in rows[1:]] == [pytest.approx(1.5), pytest.approx(1.0)]
    assert moma["savings_image_mean"] == pytest.approx(1.25)
    assert moma["savings_image_std"] == pytest.approx(math.sqrt(0.125))
    assert moma["taken_0_image_mean"] == pytest.approx(0.55) and moma["seeds"] == 2
    assert moma["step_time_vs_dense"] == pytest.approx(2.0)
    assert math.isnan(dense["taken_0_text_mean"]) and math.isnan(moma["zero_shot_accuracy_mean"])
    assert summarise.mean_std([1.0, math.nan]) == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_markdown_and_csv(tmp_path):
    rows, summary, _ = _summary(tmp_path)
    args = argparse.Namespace(
        scale="cpu", steps=20, seeds=2, dense_steps=40, multimodal=False, corpus="study"
    )
    path = tmp_path / "study.md"
    markdown.write_markdown(path, summary, args, {"loss_text": 1.5, "loss_image": 1.5}, 60.0)
    text = path.read_text()
    assert "| dense | 1.00, 1.00 | 1.00 | 1.500 ± 0.000 (1.510) |" in text
    assert "| MoMa 4t4i | 1.00, 0.50 | 2.00 | 2.500 ± 0.707 (2.510) |" in text
    assert "| MoMa 4t4i | 0.55 ± 0.00 | 0.55 ± 0.00 | - |" in text  # health: MoE rows only
    assert text.count("| dense |") == 1
    assert "Data: the study corpus. Wall time 1.0 min." in text
    markdown.write_csv(tmp_path / "runs.csv", rows)
    header = (tmp_path / "runs.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["model", "seed", "steps"] and "taken_0_image" in header


def test_plots(tmp_path):
    _, _, curve = _summary(tmp_path)
    labels = {"dense": "dense", "moma": "MoMa"}
    curves = {"moma": [summarise.eval_curve(tmp_path / f"moma{s}") for s in (0, 1)]}
    plot.plot(tmp_path / "loss.png", curves, labels, curve)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    dirs = {"moma": [tmp_path / "moma0", tmp_path / "moma1"]}
    assert plot.plot_health(tmp_path / "health.png", dirs, labels)
    assert (tmp_path / "health.png").stat().st_size > 1000
    assert not plot.plot_health(tmp_path / "none.png", {"dense": [tmp_path / "dense"]}, labels)
    assert not (tmp_path / "none.png").exists()


def test_a_missing_corpus_is_built_once(tmp_path):
    ready = tmp_path / "manifest.json"
    write = f"import pathlib; pathlib.Path({str(ready)!r}).write_text('{{}}')"
    corpus = Corpus("study", build_cmd=[sys.executable, "-c", write], ready=ready)
    run.ensure_corpus(corpus, tmp_path)
    assert ready.read_text() == "{}"
    corpus.build_cmd = [sys.executable, "-c", "raise SystemExit(3)"]
    run.ensure_corpus(corpus, tmp_path)  # there: not built again
    ready.unlink()
    with pytest.raises(SystemExit, match=r"building the study corpus failed \(3\)"):
        run.ensure_corpus(corpus, tmp_path)


def test_a_corpus_built_with_other_pairs_or_seed_is_refused(tmp_path):
    ready = tmp_path / "manifest.json"
    ready.write_text(json.dumps({"pairs": 300, "seed": 0}))
    corpus = Corpus("study", ready=ready, expected={"pairs": 300, "seed": 0})
    run.ensure_corpus(corpus, tmp_path)  # the one asked for: used as it is
    corpus.expected = {"pairs": 500, "seed": 0}
    with pytest.raises(SystemExit, match=r"built with \{'pairs': 300\}.*--corpus-pairs"):
        run.ensure_corpus(corpus, tmp_path)


def test_the_long_dense_run_reports_its_minimum_and_each_sources_epochs(tmp_path):
    rows = [
        {"step": 1, "eval/loss_text": 2.0, "eval/loss_image": 3.0, "data/documents": 40},
        {"step": 2, "eval/loss_text": 1.0, "eval/loss_image": 2.5, "data/documents": 80},
        {"step": 3, "eval/loss_text": 1.2, "eval/loss_image": 2.6, "data/documents": 120},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    curve = summarise.eval_curve(tmp_path)
    got = summarise.long_dense(tmp_path, curve, [("pairs", 3.0, 45), ("text", 1.0, 300)])
    assert (got["loss_text"], got["min_loss_text"]) == (1.2, 1.0)
    assert (got["loss_image"], got["min_loss_image"]) == (2.6, 2.5)
    # 120 documents, three quarters from pairs (weight 3 of 4): 90 / 45 = 2 epochs
    assert got["documents"] == 120
    assert got["epochs"] == pytest.approx({"pairs": 2.0, "text": 0.1})


def test_the_gap_to_dense_is_paired_by_seed():
    """Each run's gap is to dense of its own seed (the same batches), not to dense's mean:
    seed-to-seed swings shared by both models cancel."""
    rows = [
        {"model": "dense", "seed": 0, "loss_image": 2.0, "heldout_sets": {"h": {}}},
        {"model": "dense", "seed": 1, "loss_image": 3.0},
        {"model": "moma", "seed": 0, "loss_image": 1.9, "h_loss_image": 1.0},
        {"model": "moma", "seed": 1, "loss_image": 2.85},
    ]
    rows[0]["h_loss_image"] = 1.25
    keys = summarise.paired_gaps(rows)
    assert "loss_image_vs_dense" in keys and "h_loss_image_vs_dense" in keys
    assert rows[2]["loss_image_vs_dense"] == pytest.approx(-0.05)
    assert rows[3]["loss_image_vs_dense"] == pytest.approx(-0.05)  # 2.85 / 3.0 - 1
    assert rows[2]["h_loss_image_vs_dense"] == pytest.approx(-0.2)
    assert "h_loss_image_vs_dense" not in rows[3]  # dense seed 1 was not scored on h
    assert rows[0]["loss_image_vs_dense"] == 0.0


def test_a_step_without_a_groups_tokens_logs_null_and_the_readers_skip_it(tmp_path):
    """Training logs a group's statistics as null on a step where it had no tokens: the
    study's layer means and the routing heatmap read them as missing, not as a crash."""
    from mm_moe.eval.routing_plot import unprocessed_grid

    row = {"step": 10, "moe/l0/image/taken_0": None, "moe/l1/image/taken_0": 0.25}
    assert summarise.layer_mean(row, "image", "taken_0") == 0.25
    assert math.isnan(summarise.layer_mean({"moe/l0/image/taken_0": None}, "image", "taken_0"))
    steps, layers, grid = unprocessed_grid([row])
    assert steps == [10] and layers == [0, 1]
    assert math.isnan(grid["image"][0][0]) and grid["image"][1] == [0.25]


def test_the_routing_heatmap_labels_layers_by_index_and_places_irregular_steps(tmp_path):
    """MoE on layers [0, 2, 3] (layer 1 dense) reads as 0, 2, 3, not 0, 1, 2; a last step off
    the log interval sits at its own step."""
    import matplotlib.image

    from mm_moe.eval.routing_plot import _edges, unprocessed_grid, unprocessed_heatmap

    rows = [
        {"step": s, **{f"moe/l{layer}/text/taken_0": 0.1 * layer for layer in (0, 2, 3)}}
        for s in (10, 20, 30, 33)
    ]
    steps, layers, grid = unprocessed_grid(rows)
    assert steps == [10, 20, 30, 33] and layers == [0, 2, 3] and len(grid["text"]) == 3
    assert _edges(steps) == [5.0, 15.0, 25.0, 31.5, 34.5] and _edges([7]) == [6.5, 7.5]
    path = unprocessed_heatmap(rows, tmp_path / "routing.png")
    assert matplotlib.image.imread(path).shape[0] > 100
    assert unprocessed_heatmap([{"step": 1, "loss": 2.0}], tmp_path / "none.png") is None


def test_the_output_folder_is_where_the_study_was_started(tmp_path, monkeypatch):
    """The runs start in the repository; a relative --out is made absolute first, so that
    training and the evaluations after it read the same folder from any working folder."""
    monkeypatch.chdir(tmp_path)
    args = _args("--corpus=demo", "--out=mine")
    assert args.out == str(tmp_path / "mine")
