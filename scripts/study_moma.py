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

Writes OUT/study.md, OUT/study.csv (one row per model, mean and std over seeds),
OUT/study_runs.csv (one row per run), OUT/loss_vs_flops.png and each run under OUT/runs/, named
by its overrides: a finished run with the same overrides is reused (--fresh retrains), so the
long dense run doubles as dense seed 0 when --dense-steps equals --steps.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ("text", "image")

# name -> (label, Hydra overrides); CPU shapes are tiny_dense's (d=128, 4 layers).
CPU_MODELS = {
    "dense": ("dense", ["model=tiny_dense", "moe=none"]),
    "mixed8": ("mixed EC-8", ["model=tiny_dense", "moe=mixed8_ec"]),
    "moma": ("MoMa 4t4i", ["model=tiny_dense", "moe=moma_4t4i_ec"]),
    "moma_mod": (
        "MoMa 4t4i + MoD",
        [
            "model=tiny_dense",
            "moe=moma_4t4i_ec",
            "model.mod.layers=[1,3]",
            "model.mod.capacity=0.25",
        ],
    ),
    "mot": ("MoT", ["model=tiny_dense", "moe=none", "model.untie=[ffn,attention,norms]"]),
    # Token choice (dropless, top-1, renormalized): every token gets an FFN, causal.
    "moma_tc": ("MoMa 4t4i TC", ["model=tiny_dense", "moe=moma_4t4i_tc"]),
}
# MoMa expert choice with each routing remedy (docs/model.md#routing-health): `--models routing`
# runs them with dense, MoMa (EC) and MoMa TC.
_EC = ["model=tiny_dense", "moe=moma_4t4i_ec"]
ROUTING_MODELS = {
    "moma_normalized": ("MoMa EC, normalized gates", [*_EC, "moe.expert_choice_gate=normalized"]),
    "moma_orthogonal": ("MoMa EC, orthogonal router init", [*_EC, "moe.router_init=orthogonal"]),
    "moma_router_lr": ("MoMa EC, router lr x0.1", [*_EC, "moe.router_lr_scale=0.1"]),
    # Annealed over the first half of the routing study's 600 steps.
    "moma_noise": (
        "MoMa EC, Gumbel noise 1 annealed",
        [*_EC, "moe.router_noise=1.0", "moe.router_noise_anneal_steps=300"],
    ),
    "moma_cosine": ("MoMa EC, cosine router", [*_EC, "moe.router_logits=cosine"]),
}
CPU_MODELS.update(ROUTING_MODELS)
DEFAULT_MODELS = "dense,mixed8,moma,moma_tc,mot"
ROUTING = "dense,moma,moma_tc," + ",".join(ROUTING_MODELS)
# The 1.4B presets (configs/model/*_1.4b.yaml) and their dense equivalent.
GPU_MODELS = {
    "dense": ("dense 280M", ["model=dense_280m"]),
    "mixed8": ("mixed EC-8 1.4B", ["model=moe_mixed8_1.4b"]),
    "moma": ("MoMa 4t4i 1.4B", ["model=moma_4t4i_1.4b"]),
    "moma_mod": ("MoMa 4t4i + MoD 1.4B", ["model=moma_4t4i_mod_1.4b"]),
    "mot": ("MoT (dense 720M shapes)", ["model=mot_1.4b"]),
    "moma_tc": ("MoMa 4t4i TC 1.4B", ["model=moma_4t4i_1.4b", "moe=moma_4t4i_tc"]),
}
# The demo corpus and its held-out digits; a small batch that 2 CPU cores run quickly.
CPU_BASE = [
    "experiment=demo",
    "eval=demo",
    "moe.gemm=loop",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=16",
    "optim.lr=3e-3",
    "optim.warmup_steps=30",
]
# Tiny shapes for tests and smoke runs (--tiny).
TINY = [
    "data.seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=8",
    "optim.warmup_steps=2",
    "eval.num_batches=1",
    "eval.micro_batch_size=4",
    "trainer.cpu_threads=1",
]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/study_moma")
    p.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma-separated, or 'routing' ({ROUTING}); choose from {', '.join(CPU_MODELS)}",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--dense-steps", type=int, default=0, help="long dense run (0: 2 x --steps)")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--zero-shot", type=int, default=100, help="held-out images scored")
    p.add_argument("--t2i-per-label", type=int, default=5, help="generated images per class")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun if > 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once (their step times then share the machine)",
    )
    p.add_argument("--override", action="append", default=[], help="Hydra override, all runs")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke tests)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="retrain runs that a finished run with the same overrides could stand for",
    )
    p.add_argument("--reuse", action="store_true", help="(the default; kept for old commands)")
    p.add_argument(
        "--no-multimodal",
        dest="multimodal",
        action="store_false",
        help="skip the zero-shot and text-to-image evaluations",
    )
    args = p.parse_args(argv)
    table = CPU_MODELS if args.scale == "cpu" else GPU_MODELS
    models = ROUTING if args.models == "routing" else args.models
    args.model_list = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in table]
    if bad or not args.model_list:
        p.error(f"--models: unknown {bad}; choose from {', '.join(table)}")
    if "dense" not in args.model_list:
        p.error("--models must include dense (the savings factor is measured against it)")
    if args.seeds < 1 or args.steps < 1 or args.eval_interval < 1:
        p.error("--seeds, --steps and --eval-interval must be >= 1")
    args.dense_steps = args.dense_steps or 2 * args.steps
    if args.dense_steps < args.steps:
        p.error("--dense-steps must be >= --steps")
    args.table = table
    return args


def _overrides(args, name: str, seed: int, steps: int, run_dir: Path) -> list[str]:
    base = CPU_BASE if args.scale == "cpu" else ["eval=demo"]
    warmup = 2 if args.tiny else 30
    return [
        *base,
        *(TINY if args.tiny else []),
        *args.table[name][1],
        f"trainer.max_steps={steps}",
        f"trainer.seed={seed}",
        f"trainer.log_interval={args.eval_interval}",
        f"eval.interval={args.eval_interval}",
        f"optim.decay_steps={max(1, args.dense_steps - warmup)}",
        # A run cut short (a killed session) continues from its last checkpoint on rerun.
        f"checkpoint.interval={min(steps, 250)}",
        "checkpoint.keep_last=1",
        "checkpoint.resume=auto",
        "checkpoint.overwrite=true",
        "logging.wandb.mode=disabled",
        "logging.progress=lines",
        f"trainer.run_dir={run_dir}",
        *args.override,
    ]


def run_dir_for(args, name: str, seed: int, steps: int) -> Path:
    """Runs are named by what they train: a finished run stands for any later request with the
    same composed config (the dense seed-0 run is the long dense run when --dense-steps ==
    --steps, and studies share their common runs), and a changed preset, experiment or data
    config is a new run."""
    return (
        Path(args.out)
        / "runs"
        / f"{name}_s{seed}_{steps}_{_config_digest(args, name, seed, steps)}"
    )


_DIGESTS: dict[tuple, str] = {}
# The composed eval settings of each run's overrides: what its zero-shot and text->image
# evaluations use (composed with the digest, in the main thread: Hydra is one per process).
_EVAL_SETTINGS: dict[tuple, tuple] = {}


def _config_digest(args, name: str, seed: int, steps: int) -> str:
    overrides = [o for o in _overrides(args, name, seed, steps, Path()) if "run_dir=" not in o]
    key = tuple(overrides)
    if key not in _DIGESTS:
        from dataclasses import asdict

        from mm_moe.cli import compose

        composed = compose(overrides)
        _EVAL_SETTINGS[key] = (composed.eval.zero_shot, composed.eval.text_to_image)
        cfg = asdict(composed)
        cfg["trainer"].pop("run_dir", None)
        # What the evaluations after training read, not what trains: a change re-evaluates the
        # finished runs (train_and_eval) instead of training them again.
        cfg["eval"].pop("zero_shot")
        cfg["eval"].pop("text_to_image")
        cfg.pop("checkpoint")  # where and how often it saves: not what it trains (exact resume)
        # How fast it trains, not what: the image cache is exact, and the fused AdamW differs
        # from the per-tensor loop only in rounding (runs from before these keys still count).
        cfg["data"].pop("image_cache_size", None)
        cfg["optim"].pop("fused", None)
        text = [json.dumps(cfg, sort_keys=True, default=str)]
        # The demo corpus and tokenizers too, when the run reads them: rebuilt ones are new data.
        built = [
            REPO / "data" / "demo" / "corpus.json",
            REPO / "tokenizers" / "demo" / "metrics.json",
        ]
        text += [p.read_text() for p in built if p.is_file()]
        _DIGESTS[key] = hashlib.sha1("\n".join(text).encode()).hexdigest()[:8]
    return _DIGESTS[key]


def _trained(run_dir: Path, steps: int) -> dict | None:
    """What a finished training of this run recorded (evals.json), or None."""
    path = run_dir / "evals.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if done.get("steps") == steps else None


def train_and_eval(args, name: str, seed: int, steps: int, run_dir: Path) -> dict:
    done = None if args.fresh else _trained(run_dir, steps)
    settings = _multimodal_settings(args, name, seed, steps)
    if done is not None:
        # Evaluated without them, or with other sampling settings or sample counts.
        if args.multimodal and done.get("multimodal_settings") != settings:
            t0 = time.perf_counter()
            done.update(_multimodal(run_dir, seed, settings), eval_s=time.perf_counter() - t0)
            (run_dir / "evals.json").write_text(json.dumps(done, indent=1))
        return done
    cmd = [sys.executable, "-m", "mm_moe.train"]
    if args.nproc > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", "-m", "mm_moe.train"]
    cmd += _overrides(args, name, seed, steps, run_dir)
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:  # a resumed run continues its log
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise SystemExit(f"study: {name} seed {seed} failed ({proc.returncode}):\n{tail}")
    train_s = time.perf_counter() - t0
    result = {"steps": steps, "train_s": train_s}
    if args.multimodal:
        result.update(_multimodal(run_dir, seed, settings))
    result["eval_s"] = time.perf_counter() - t0 - train_s
    (run_dir / "evals.json").write_text(json.dumps(result, indent=1))
    return result


def _multimodal_settings(args, name: str, seed: int, steps: int) -> dict:
    """The zero-shot and text->image settings of this run's composed config, with the study's
    sample counts (plain JSON: evals.json records what its figures were measured with)."""
    from dataclasses import asdict, replace

    overrides = [o for o in _overrides(args, name, seed, steps, Path()) if "run_dir=" not in o]
    zero_shot, t2i = _EVAL_SETTINGS[tuple(overrides)]
    return json.loads(
        json.dumps(
            {
                "zero_shot": asdict(replace(zero_shot, num_samples=args.zero_shot)),
                "text_to_image": asdict(replace(t2i, samples_per_label=args.t2i_per_label)),
            }
        )
    )


def _multimodal(run_dir: Path, seed: int, settings: dict) -> dict:
    from dataclasses import replace

    import torch

    import mm_moe
    from mm_moe.eval.config import TextToImageConfig, ZeroShotConfig
    from mm_moe.eval.multimodal import multimodal_evals

    model = mm_moe.load_pretrained(run_dir, "cuda" if torch.cuda.is_available() else "cpu")
    cfg = model.train_config
    ev = replace(
        cfg.eval,
        zero_shot=ZeroShotConfig(**settings["zero_shot"]),
        text_to_image=TextToImageConfig(**settings["text_to_image"]),
    )
    r = multimodal_evals(model, cfg.tokenizer.build(), cfg.tokenizer, ev, run_dir, seed)
    return {
        "zero_shot_accuracy": r["zero_shot"]["accuracy"],
        "zero_shot_images": r["zero_shot"]["num_images"],
        "t2i_accuracy": r["text_to_image"]["accuracy"],
        "t2i_images": r["text_to_image"]["num_images"],
        "judge_accuracy": r["judge_accuracy"],
        "multimodal_settings": settings,
    }


def eval_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss_text" in r]


def flops_needed(curve: list[dict], modality: str, target: float) -> tuple[float, str]:
    """Dense FLOPs (on `modality` tokens) to reach `target` held-out loss, and '' or the
    bound ('>' the dense run never got there, '<' it was there at its first evaluation)."""
    xs = [r[f"flops_cumulative_{modality}"] for r in curve]
    ys, best = [], math.inf
    for r in curve:  # running minimum: the first time dense reaches a loss
        best = min(best, r[f"eval/loss_{modality}"])
        ys.append(best)
    if target < ys[-1]:
        return xs[-1], ">"
    if target >= ys[0]:
        return xs[0], "<"
    i = next(i for i, y in enumerate(ys) if y <= target)
    y0, y1 = ys[i - 1], ys[i]
    t = (y0 - target) / (y0 - y1) if y0 != y1 else 1.0
    return math.exp(math.log(xs[i - 1]) + t * (math.log(xs[i]) - math.log(xs[i - 1]))), ""


HEALTH = ("taken_0", "gate_mean", "router_cosine", "jaccard")


def _layer_mean(row: dict, modality: str, stat: str) -> float:
    """A metrics row's `moe/l*/{modality}/{stat}`, averaged over layers (NaN when absent)."""
    values = [v for k, v in row.items() if k.endswith(f"/{modality}/{stat}")]
    return statistics.fmean(values) if values else math.nan


def routing_health(run_dir: Path) -> dict:
    """The last logged routing health, per modality group, averaged over layers: {f"{stat}_{m}"}
    (NaN for models without expert groups per modality)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = next((r for r in reversed(rows) if any(k.endswith("/taken_0") for k in r)), {})
    return {f"{stat}_{m}": _layer_mean(last, m, stat) for stat in HEALTH for m in MODALITIES}


def health_curve(run_dir: Path) -> list[tuple[int, dict]]:
    """[(step, {modality: share of its tokens no expert processed, mean over layers})] at
    every logged step that has the routing health."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], {m: _layer_mean(r, m, "taken_0") for m in MODALITIES}) for r in rows]
    return [(step, shares) for step, shares in curve if not all(map(math.isnan, shares.values()))]


def step_time(run_dir: Path) -> float:
    """Median training step time (s) over the logged steps after the first few."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 20]
    return statistics.median(times or [r["step_time_s"] for r in rows if "step_time_s" in r])


def _run_row(name: str, seed: int, run_dir: Path, result: dict, dense_curve) -> dict:
    last = eval_curve(run_dir)[-1]
    row = {"model": name, "seed": seed, "steps": last["step"], **result}
    row["step_time_s"] = step_time(run_dir)
    row.update(routing_health(run_dir))
    for m in MODALITIES:
        row[f"loss_{m}"] = last[f"eval/loss_{m}"]
        row[f"train_routing_loss_{m}"] = last[f"eval/train_routing/loss_{m}"]
        row[f"flops_{m}"] = last[f"flops_cumulative_{m}"]
        needed, bound = flops_needed(dense_curve, m, row[f"loss_{m}"])
        row[f"savings_{m}"] = needed / row[f"flops_{m}"]
        row[f"savings_{m}_bound"] = bound
    row["flops"] = last["flops_cumulative"]
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; NaN for both when any value is NaN (a metric a run did not
    measure, e.g. zero-shot with --no-multimodal: statistics.stdev raises on NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], labels: dict, flops_per_token: dict) -> list[dict]:
    out = []
    dense_time = statistics.fmean(r["step_time_s"] for r in rows if r["model"] == "dense")
    for name in labels:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        s = {"model": name, "label": labels[name], "seeds": len(mine)}
        for m in MODALITIES:
            s[f"flops_per_token_{m}"] = flops_per_token[name][m]
        s["step_time_vs_dense"] = statistics.fmean(r["step_time_s"] for r in mine) / dense_time
        keys = [f"loss_{m}" for m in MODALITIES] + [f"train_routing_loss_{m}" for m in MODALITIES]
        keys += ["zero_shot_accuracy", "t2i_accuracy", "judge_accuracy"]
        keys += [f"savings_{m}" for m in MODALITIES]
        keys += [f"{stat}_{m}" for stat in HEALTH for m in MODALITIES]
        for k in keys:
            s[f"{k}_mean"], s[f"{k}_std"] = _mean_std([r.get(k, math.nan) for r in mine])
        for m in MODALITIES:
            bounds = {r[f"savings_{m}_bound"] for r in mine} - {""}
            s[f"savings_{m}_bound"] = "".join(sorted(bounds))
        out.append(s)
    return out


def _fmt(s: dict, key: str, digits: int = 3, pct: bool = False) -> str:
    mean, std = s[f"{key}_mean"], s[f"{key}_std"]
    if math.isnan(mean):
        return "-"
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_markdown(
    path: Path,
    summary: list[dict],
    args,
    dense_long: dict,
    wall_s: float,
    health_plot: bool = False,
):
    dense_fpt = next(s for s in summary if s["model"] == "dense")
    lines = [
        f"# MoMa study ({args.scale}, {args.steps} steps, {args.seeds} seeds; long dense run "
        f"{args.dense_steps} steps)",
        "",
        "Held-out loss with inference routing (causal auxiliary routers), mean ± std over "
        "seeds; in brackets the loss with training routing. Savings: dense FLOPs to reach the "
        "model's final held-out loss / the model's FLOPs, per modality (>X: below anything "
        "the long dense run reached).",
        "",
        "| model | FLOPs/token vs dense (text, image) | step time vs dense | text loss | "
        "image loss | zero-shot acc | text->image acc | savings text | savings image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        rel = [s[f"flops_per_token_{m}"] / dense_fpt[f"flops_per_token_{m}"] for m in MODALITIES]
        sav = []
        for m in MODALITIES:
            bound = s[f"savings_{m}_bound"]
            sav.append(f"{bound}{_fmt(s, f'savings_{m}', 2)}")
        lines.append(
            f"| {s['label']} | {rel[0]:.2f}, {rel[1]:.2f} | {s['step_time_vs_dense']:.2f} | "
            f"{_fmt(s, 'loss_text')} "
            f"({s['train_routing_loss_text_mean']:.3f}) | {_fmt(s, 'loss_image')} "
            f"({s['train_routing_loss_image_mean']:.3f}) | "
            f"{_fmt(s, 'zero_shot_accuracy', pct=True)} | {_fmt(s, 't2i_accuracy', pct=True)} | "
            f"{sav[0]} | {sav[1]} |"
        )
    lines += ["", *_health_table(summary), ""]
    lines.append(
        f"Long dense run: final held-out loss text {dense_long['loss_text']:.3f}, image "
        f"{dense_long['loss_image']:.3f}. Step time: median of the logged training steps, "
        f"mean over seeds, relative to dense. "
    )
    if args.multimodal:
        judge = statistics.fmean(s["judge_accuracy_mean"] for s in summary)
        lines[-1] += (
            f"Zero-shot: {args.zero_shot} held-out digits, chance 10%. Text->image: "
            f"{args.t2i_per_label} images per digit judged by a classifier with "
            f"{100 * judge:.1f}% accuracy on real (VQ-reconstructed) held-out digits. "
        )
    lines[-1] += f"Wall time {wall_s / 60:.1f} min."
    lines += ["", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    if health_plot:
        lines += ["![tokens no expert processed](routing_health.png)", ""]
    path.write_text("\n".join(lines))


def _health_table(summary: list[dict]) -> list[str]:
    """Routing health at the end of training, per modality group, mean over layers."""
    moe = [s for s in summary if not math.isnan(s["taken_0_image_mean"])]
    if not moe:
        return []
    lines = [
        "Routing health at the last logged step (mean over layers; docs/model.md#routing-health):",
        "",
        "| model | no expert: text | no expert: image | gate mean: text | gate mean: image "
        "| router cosine: image | selection overlap: image |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in moe:
        cells = [
            _fmt(s, "taken_0_text", 2),
            _fmt(s, "taken_0_image", 2),
            _fmt(s, "gate_mean_text", 2),
            _fmt(s, "gate_mean_image", 2),
            _fmt(s, "router_cosine_image", 2),
            _fmt(s, "jaccard_image", 2),
        ]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def plot_health(path: Path, run_dirs: dict[str, list[Path]], labels: dict) -> bool:
    """Per modality, the share of tokens no expert processed against the step, per model
    (mean over seeds and layers); False (nothing drawn) when no model logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: [health_curve(d) for d in dirs] for name, dirs in run_dirs.items()}
    curves = {name: runs for name, runs in curves.items() if all(runs)}
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, m in zip(axes, MODALITIES):
        for name, runs in curves.items():
            n = min(len(c) for c in runs)
            steps = [runs[0][i][0] for i in range(n)]
            share = [statistics.fmean(c[i][1][m] for c in runs) for i in range(n)]
            ax.plot(steps, share, marker="o", markersize=3, label=labels[name])
        ax.set_xlabel("training step")
        ax.set_title(f"{m} tokens processed by no expert")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the group's tokens, mean over layers")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(path: Path, curves: dict, labels: dict, dense_curve: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m in zip(axes, MODALITIES):
        xs = [r[f"flops_cumulative_{m}"] for r in dense_curve]
        ax.plot(xs, [r[f"eval/loss_{m}"] for r in dense_curve], "k--", label="dense (long)")
        for name, runs in curves.items():
            n = min(len(c) for c in runs)
            x = [statistics.fmean(c[i][f"flops_cumulative_{m}"] for c in runs) for i in range(n)]
            y = [statistics.fmean(c[i][f"eval/loss_{m}"] for c in runs) for i in range(n)]
            ax.plot(x, y, marker="o", markersize=2, label=labels[name])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels overlapped
        ax.set_xlabel(f"cumulative training FLOPs on {m} tokens")
        ax.set_ylabel(f"held-out {m} loss (inference routing)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _flops_per_token(args, name: str) -> dict:
    from hydra import compose, initialize_config_dir

    from mm_moe.config import TrainConfig
    from mm_moe.config.overrides import check_overrides
    from mm_moe.train import CONFIG_DIR, ENTRY_GROUPS, build_config

    overrides = _overrides(args, name, 0, args.steps, Path("runs/unused"))
    overrides = check_overrides(overrides, TrainConfig, ENTRY_GROUPS)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = build_config(compose("train", overrides=overrides))
    model = cfg.model.with_vocab(cfg.tokenizer.build().vocab.size)
    return model.flops_per_token(cfg.data.seq_len, cfg.moe)


def _train_all(args) -> dict[tuple, dict]:
    """Train and evaluate every run (the long dense run and each model and seed), --jobs at a
    time; {(name, seed, steps): result}."""
    tasks = [("dense", 0, args.dense_steps)]
    tasks += [(name, seed, args.steps) for seed in range(args.seeds) for name in args.model_list]
    tasks = list(dict.fromkeys(tasks))
    run_dirs = {t: run_dir_for(args, *t) for t in tasks}  # composed here: Hydra is one per process

    def work(task):
        name, seed, steps = task
        print(f"[study] {name} seed {seed}: {steps} steps", flush=True)
        result = train_and_eval(args, name, seed, steps, run_dirs[task])
        print(
            f"[study] {name} seed {seed} done: {result['train_s']:.0f}s train, "
            f"{result.get('eval_s', 0):.0f}s evals",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(zip(tasks, pool.map(work, tasks)))


def main(argv=None) -> None:
    args = _args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Threads per run: the machine's cores shared by the runs trained at once.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.jobs)))
    labels = {m: args.table[m][0] for m in args.model_list}
    t0 = time.perf_counter()
    results = _train_all(args)
    dense_curve = eval_curve(run_dir_for(args, "dense", 0, args.dense_steps))
    rows, curves, run_dirs = [], {}, {}
    for seed in range(args.seeds):
        for name in args.model_list:
            run_dir = run_dir_for(args, name, seed, args.steps)
            result = results[(name, seed, args.steps)]
            rows.append(_run_row(name, seed, run_dir, result, dense_curve))
            curves.setdefault(name, []).append(eval_curve(run_dir))
            run_dirs.setdefault(name, []).append(run_dir)
            print(
                f"[study] {name} seed {seed}: loss text {rows[-1]['loss_text']:.3f} image "
                f"{rows[-1]['loss_image']:.3f}; zero-shot "
                f"{rows[-1].get('zero_shot_accuracy', math.nan):.2f}; no expert (image) "
                f"{rows[-1]['taken_0_image']:.2f}",
                flush=True,
            )
    flops_per_token = {name: _flops_per_token(args, name) for name in args.model_list}
    summary = summarize(rows, labels, flops_per_token)
    write_csv(out / "study_runs.csv", rows)
    write_csv(out / "study.csv", summary)
    plot(out / "loss_vs_flops.png", curves, labels, dense_curve)
    health_plot = plot_health(out / "routing_health.png", run_dirs, labels)
    last = dense_curve[-1]
    dense_long = {f"loss_{m}": last[f"eval/loss_{m}"] for m in MODALITIES}
    wall_s = time.perf_counter() - t0
    write_markdown(out / "study.md", summary, args, dense_long, wall_s, health_plot)
    print((out / "study.md").read_text())
    print(
        f"[study] wrote {out}/study.md, study.csv, study_runs.csv, loss_vs_flops.png"
        + (", routing_health.png" if health_plot else "")
    )


if __name__ == "__main__":
    main()
