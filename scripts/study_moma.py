"""The MoMa comparison study: dense, mixed expert-choice (8 experts), MoMa 4t4i (expert choice,
the paper's router), MoMa 4t4i token choice and Mixture-of-Transformers (MoMa + mixture-of-depths
on request), trained on the same data at (about) equal active FLOPs per token, for several
seeds; then the FLOPs-savings factor per modality against a longer dense run, the training step
time relative to dense and the routing health at the end.

    .venv/bin/python scripts/study_moma.py                      # the default CPU study
    .venv/bin/python scripts/study_moma.py --models routing --seeds 2 --no-multimodal \
        --out runs/study_routing                                 # the routing remedies
    .venv/bin/python scripts/study_moma.py --steps 4 --seeds 1 --models dense,moma --tiny
    .venv/bin/python scripts/study_moma.py --scale gpu --nproc 8 --steps 5000 \\
        --override data=my_data --override eval.sources=[...]

Seeds: seed s sets trainer.seed=s for every model, so within a seed all models see the same
batches in the same order (paired comparison) and start from their seed-s initialisation;
the spread over seeds covers both initialisation and data order.

Every run uses one learning-rate schedule: warmup, then a cosine over the long dense run's
length (optim.decay_steps), so each shorter run is a prefix of that schedule and the dense
curve is comparable at every FLOPs point. The savings factor of a model for modality m is
F_dense(L_m) / F_model: the dense FLOPs (on m's tokens) needed to reach the model's final
held-out loss L_m (log-linear interpolation on the long dense run's held-out curve, made
monotone by a running minimum), over the model's FLOPs on m's tokens. '>X' means the model's
loss is below anything the dense run reached (X is a lower bound); '<X' means the dense run
was already there at its first evaluation; a factor below 1 means dense did better.

Data (--corpus): `study` (the default) reads the corpus of data_pipelines/build_study_corpus.py
in --corpus-dir, built there with --corpus-pairs and --corpus-seed where missing, where no
training image repeats; `demo` reads experiment=demo's data (data/demo), as studies before
the option did (their runs are found again).

Writes OUT/study.md, OUT/study.csv (one row per model, mean and std over seeds),
OUT/study_runs.csv (one row per run), OUT/loss_vs_flops.png and each run under OUT/runs/, named
by its overrides: a finished run with the same overrides is reused (--fresh retrains), so the
long dense run doubles as dense seed 0 when --dense-steps equals --steps.

The study itself lives in mm_moe/eval/study/ (plan, run, summarise, plot, markdown).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_moe.cli import compose, exits_on_failure
from mm_moe.eval.study import run_study
from mm_moe.eval.study.plan import CPU_MODELS, DEFAULT_MODELS, ROUTING, check_args

REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/study_moma")
    models = f"comma-separated, or 'routing' ({ROUTING}); choose from {', '.join(CPU_MODELS)}"
    p.add_argument("--models", default=DEFAULT_MODELS, help=models)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--dense-steps", type=int, default=0, help="long dense run (0: 2 x --steps)")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--zero-shot", type=int, default=100, help="held-out images scored")
    p.add_argument("--t2i-per-label", type=int, default=5, help="generated images per class")
    whole = (
        "micro-batches of packed rows scored from each whole held-out set (the corpus's "
        "heldout/ and heldout_deformed/) with each final model; 0: none"
    )
    p.add_argument("--heldout-batches", type=int, default=32, help=whole)
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun if > 1)")
    jobs = "runs trained at once (their step times then share the machine)"
    p.add_argument("--jobs", type=int, default=1, help=jobs)
    p.add_argument("--override", action="append", default=[], help="Hydra override, all runs")
    moe_only = "Hydra override, runs with experts only (dense and MoT keep theirs: one dense run)"
    p.add_argument("--moe-override", action="append", default=[], help=moe_only)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke tests)")
    fresh = "retrain runs that a finished run with the same overrides could stand for"
    p.add_argument("--fresh", action="store_true", help=fresh)
    p.add_argument("--reuse", action="store_true", help="(the default; kept for old commands)")
    p.add_argument(
        "--no-multimodal",
        dest="multimodal",
        action="store_false",
        help="skip the zero-shot and text-to-image evaluations",
    )
    corpus = (
        "study: no training image repeats (data_pipelines/build_study_corpus.py); demo: data/demo"
    )
    p.add_argument("--corpus", choices=("study", "demo"), default="study", help=corpus)
    p.add_argument(
        "--corpus-dir",
        default="data/study",
        help="the study corpus (built if missing; a relative path is the repository's)",
    )
    # 32 pairs a step at the CPU defaults: the 3000-step long dense run reads about 96,000.
    pairs = "its training pairs (built with them where missing): no image repeats below that"
    p.add_argument("--corpus-pairs", type=int, default=100000, help=pairs)
    p.add_argument("--corpus-seed", type=int, default=0, help="its deformations' seed, if built")
    return p


def _args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    error = check_args(args)
    if error:
        p.error(error)
    # The runs start in the repository (a relative --corpus-dir is the repository's, as the
    # runs' digests have always named it); --out is where the study was started.
    args.out = str(Path(args.out).resolve())
    return args


def main(argv=None) -> None:
    args = _args(argv)
    with exits_on_failure("study_moma.py"):  # a config error: one line, exit 2
        study_md = run_study(args, compose, REPO, sys.executable)
    print(study_md.read_text())
    out = study_md.parent
    health = ", routing_health.png" if (out / "routing_health.png").is_file() else ""
    print(f"[study] wrote {out}/study.md, study.csv, study_runs.csv, loss_vs_flops.png{health}")


if __name__ == "__main__":
    main()
