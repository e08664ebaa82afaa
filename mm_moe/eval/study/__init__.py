"""The MoMa comparison study behind scripts/study_moma.py (its docstring: what it measures).

plan.py: the models, the corpus, each run's overrides and the digest naming its directory;
run.py: building the corpus, training and evaluating the runs (finished ones reused);
summarise.py: curves, savings, routing health, mean ± std over seeds; plot.py: the figures;
markdown.py: study.md and the CSV files. `run_study` ties them together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from mm_moe.eval.study import markdown, plot, run, summarise
from mm_moe.eval.study.plan import Planner, check_heldout, corpus_for, label


def run_study(args, compose: Callable, repo: Path, python: str) -> Path:
    """Trains what is missing, then writes OUT/study.md, study.csv, study_runs.csv and the
    plots; `compose(overrides)` gives a run's validated TrainConfig. Returns study.md."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Threads per run: the machine's cores shared by the runs trained at once.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.jobs)))
    run.ensure_corpus(corpus_for(args, repo, python), repo)
    corpus = corpus_for(args, repo, python)  # after the build: its pretokenized shards, if any
    if getattr(args, "heldout_batches", 0):
        check_heldout(corpus)
    planner = Planner(args, compose, corpus)
    labels = {m: label(args, m) for m in args.model_list}
    t0 = time.perf_counter()
    results = run.train_all(planner, repo)
    dense_curve = summarise.eval_curve(planner.run_dir("dense", 0, args.dense_steps))
    rows, curves, run_dirs = summarise.collect(args, planner.run_dir, results, dense_curve)
    flops_per_token = {name: planner.flops_per_token(name) for name in args.model_list}
    summary = summarise.summarize(rows, labels, flops_per_token)
    markdown.write_csv(out / "study_runs.csv", rows)
    markdown.write_csv(out / "study.csv", summary)
    plot.plot(out / "loss_vs_flops.png", curves, labels, dense_curve)
    health_plot = plot.plot_health(out / "routing_health.png", run_dirs, labels)
    dense_run = planner.run_dir("dense", 0, args.dense_steps)
    dense_long = summarise.long_dense(dense_run, dense_curve, planner.source_sizes())
    wall_s = time.perf_counter() - t0
    sets = summarise.heldout_sets(rows)
    markdown.write_markdown(out / "study.md", summary, args, dense_long, wall_s, health_plot, sets)
    return out / "study.md"
