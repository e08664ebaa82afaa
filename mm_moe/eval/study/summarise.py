"""Reading the runs' metrics.jsonl: held-out curves, the FLOPs-savings factor against the long
dense run, routing health and step time, per run and as mean ± std over seeds.

The savings factor of a model for modality m is F_dense(L_m) / F_model: the dense FLOPs (on
m's tokens) needed to reach the model's final held-out loss L_m (log-linear interpolation on
the long dense run's held-out curve, made monotone by a running minimum), over the model's
FLOPs on m's tokens.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from mm_moe.eval.study.plan import MODALITIES

HEALTH = ("taken_0", "gate_mean", "router_cosine", "jaccard")
# What each whole held-out set's evaluation after training gives (run.whole_heldout).
HELDOUT_LOSSES = [f"{p}loss_{m}" for p in ("", "train_routing_") for m in MODALITIES]
WHOLE_HELDOUT = HELDOUT_LOSSES + [f"tokens_{m}" for m in MODALITIES]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_curve(run_dir: Path) -> list[dict]:
    return [r for r in _rows(run_dir) if "eval/loss_text" in r]


def long_dense(run_dir: Path, curve: list[dict], sources: list[tuple[str, float, int]]) -> dict:
    """The long dense run's final and lowest held-out loss per modality, the documents it
    read, and each training source's epochs in it: (name, weight, documents in the source)
    per source; sources are drawn by weight, document by document, so a source's expected
    share of the documents read is its weight's share."""
    out = {}
    for m in MODALITIES:
        losses = [r[f"eval/loss_{m}"] for r in curve]
        out[f"loss_{m}"], out[f"min_loss_{m}"] = losses[-1], min(losses)
    documents = [r["data/documents"] for r in _rows(run_dir) if "data/documents" in r]
    out["documents"] = documents[-1] if documents else 0
    total = sum(w for _, w, _ in sources) or 1.0
    out["epochs"] = {
        name: out["documents"] * w / total / size for name, w, size in sources if size > 0
    }
    return out


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


def layer_mean(row: dict, modality: str, stat: str) -> float:
    """A metrics row's `moe/l*/{modality}/{stat}`, averaged over layers (NaN when absent)."""
    values = [
        v
        for k, v in row.items()
        if k.endswith(f"/{modality}/{stat}") and v is not None and not math.isnan(v)
    ]  # null: a step without the group's tokens
    return statistics.fmean(values) if values else math.nan


def routing_health(run_dir: Path) -> dict:
    """The last logged routing health, per modality group, averaged over layers: {f"{stat}_{m}"}
    (NaN for models without expert groups per modality)."""
    rows = _rows(run_dir)
    last = next((r for r in reversed(rows) if any(k.endswith("/taken_0") for k in r)), {})
    return {f"{stat}_{m}": layer_mean(last, m, stat) for stat in HEALTH for m in MODALITIES}


def health_curve(run_dir: Path) -> list[tuple[int, dict]]:
    """[(step, {modality: share of its tokens no expert processed, mean over layers})] at
    every logged step that has the routing health."""
    curve = [
        (r["step"], {m: layer_mean(r, m, "taken_0") for m in MODALITIES}) for r in _rows(run_dir)
    ]
    return [(step, shares) for step, shares in curve if not all(map(math.isnan, shares.values()))]


def step_time(run_dir: Path) -> float:
    """Median training step time (s) over the logged steps after the first few."""
    rows = _rows(run_dir)
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 20]
    return statistics.median(times or [r["step_time_s"] for r in rows if "step_time_s" in r])


def run_row(name: str, seed: int, run_dir: Path, result: dict, dense_curve) -> dict:
    """One run's figures: final held-out losses, FLOPs, savings per modality, health."""
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
    for set_name, scores in result.get("heldout_sets", {}).items():
        row.update({f"{set_name}_{key}": value for key, value in scores.items()})
    return row


def heldout_sets(rows: list[dict]) -> list[str]:
    """The whole held-out sets the runs were scored on after training, in their order."""
    names = (name for r in rows for name in r.get("heldout_sets", {}))
    return list(dict.fromkeys(names))


def paired_gaps(rows: list[dict]) -> list[str]:
    """Adds to every run's row, for each held-out loss, its relative difference to dense's
    of the same seed (`<key>_vs_dense`: the same batches in the same order, so the spread
    over seeds of this paired gap is the one to read a sign from); returns the new keys."""
    keys = HELDOUT_LOSSES + [f"{name}_{k}" for name in heldout_sets(rows) for k in HELDOUT_LOSSES]
    dense = {r["seed"]: r for r in rows if r["model"] == "dense"}
    for row in rows:
        ref = dense.get(row["seed"], {})
        for key in keys:
            if key in row and key in ref:
                row[f"{key}_vs_dense"] = row[key] / ref[key] - 1
    return [f"{key}_vs_dense" for key in keys]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; NaN for both when any value is NaN (a metric a run did not
    measure, e.g. zero-shot with --no-multimodal: statistics.stdev raises on NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], labels: dict, flops_per_token: dict) -> list[dict]:
    """One row per model: mean and std over seeds, step time relative to dense."""
    out = []
    dense_time = statistics.fmean(r["step_time_s"] for r in rows if r["model"] == "dense")
    keys = [f"loss_{m}" for m in MODALITIES] + [f"train_routing_loss_{m}" for m in MODALITIES]
    keys += ["zero_shot_accuracy", "t2i_accuracy", "judge_accuracy"]
    keys += [f"savings_{m}" for m in MODALITIES]
    keys += [f"{stat}_{m}" for stat in HEALTH for m in MODALITIES]
    keys += [f"{name}_{key}" for name in heldout_sets(rows) for key in WHOLE_HELDOUT]
    keys += paired_gaps(rows)
    for name in labels:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        s = {"model": name, "label": labels[name], "seeds": len(mine)}
        for m in MODALITIES:
            s[f"flops_per_token_{m}"] = flops_per_token[name][m]
        s["step_time_vs_dense"] = statistics.fmean(r["step_time_s"] for r in mine) / dense_time
        for k in keys:
            s[f"{k}_mean"], s[f"{k}_std"] = mean_std([r.get(k, math.nan) for r in mine])
        for m in MODALITIES:
            bounds = {r[f"savings_{m}_bound"] for r in mine} - {""}
            s[f"savings_{m}_bound"] = "".join(sorted(bounds))
        out.append(s)
    return out


def collect(args, run_dir_of, results: dict, dense_curve: list[dict]):
    """Every run's row, held-out curve and directory, in seed then model order:
    (rows, {model: [curve per seed]}, {model: [run dir per seed]})."""
    rows, curves, run_dirs = [], {}, {}
    for seed in range(args.seeds):
        for name in args.model_list:
            run_dir = run_dir_of(name, seed, args.steps)
            result = results[(name, seed, args.steps)]
            rows.append(run_row(name, seed, run_dir, result, dense_curve))
            curves.setdefault(name, []).append(eval_curve(run_dir))
            run_dirs.setdefault(name, []).append(run_dir)
            print(
                f"[study] {name} seed {seed}: loss text {rows[-1]['loss_text']:.3f} image "
                f"{rows[-1]['loss_image']:.3f}; zero-shot "
                f"{rows[-1].get('zero_shot_accuracy', math.nan):.2f}; no expert (image) "
                f"{rows[-1]['taken_0_image']:.2f}",
                flush=True,
            )
    return rows, curves, run_dirs
