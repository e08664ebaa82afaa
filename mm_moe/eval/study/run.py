"""Running the study's jobs: build the corpus where missing, train each run in a subprocess
(`python -m mm_moe.train`, torchrun with --nproc > 1) unless a finished one is found, and
score the trained models zero-shot and text->image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from mm_moe.checkpoint import layout
from mm_moe.eval.study.plan import Corpus, Planner


def ensure_corpus(corpus: Corpus, cwd: Path) -> None:
    """Builds the corpus with its command where it is not there yet."""
    if corpus.ready is None:
        return
    if corpus.ready.is_file():
        built = json.loads(corpus.ready.read_text())
        asked = {k: v for k, v in corpus.expected.items() if built.get(k) != v}
        if asked:
            found = {k: built.get(k) for k in asked}
            raise SystemExit(
                f"study: the corpus in {corpus.ready.parent} was built with {found}, not "
                f"{asked}: pass --corpus-pairs/--corpus-seed to match it, or another "
                "--corpus-dir to build one there"
            )
        return
    print(f"[study] building the {corpus.name} corpus: {' '.join(corpus.build_cmd)}", flush=True)
    proc = subprocess.run(corpus.build_cmd, cwd=cwd)
    if proc.returncode or not corpus.ready.is_file():
        raise SystemExit(f"study: building the {corpus.name} corpus failed ({proc.returncode})")


def trained(run_dir: Path, steps: int) -> dict | None:
    """What a finished training of this run recorded (evals.json), or None."""
    path = run_dir / "evals.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if done.get("steps") == steps else None


def train_command(args, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "mm_moe.train"]
    if args.nproc > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", "-m", "mm_moe.train"]
    return cmd + overrides


def continued_from(planner: Planner, name: str, seed: int, steps: int) -> Path | None:
    """The finished shorter run this run continues, where it has not started yet: the
    longest whose last checkpoint is its final step (a 3000-step study continues the
    1500-step one's runs instead of training their first 1500 steps again). Composes: call
    in the main thread."""
    if planner.args.fresh or planner.run_dir(name, seed, steps).exists():
        return None
    for shorter, run_dir in planner.prefix_runs(name, seed, steps):
        last = layout.latest_step_dir(run_dir / "checkpoints")
        final = last is not None and layout.step_of(last) == shorter
        if final and trained(run_dir, shorter):
            return run_dir
    return None


def _start_from(prefix: Path, run_dir: Path) -> None:
    """Gives run_dir the shorter run's last checkpoint (hard links where the filesystem has
    them: checkpoint files are never written in place) and its metrics rows; training then
    resumes there (checkpoint.resume=auto), exactly as the shorter run would have gone on."""
    source = layout.latest_step_dir(prefix / "checkpoints")
    step = layout.step_of(source)
    root = run_dir / "checkpoints"
    tmp = layout.new_tmp_dir(root, step)
    shutil.copytree(source, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
    layout.publish(root, tmp, step)
    shutil.copy2(prefix / "metrics.jsonl", run_dir / "metrics.jsonl")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def train_and_eval(
    planner: Planner, name: str, seed: int, steps: int, cwd: Path, prefix: Path | None = None
) -> dict:
    """Trains the run (or finds it trained; continues `prefix`, a finished shorter run of the
    same training, where given) and evaluates it; what evals.json records."""
    args, run_dir = planner.args, planner.run_dir(name, seed, steps)
    done = None if args.fresh else trained(run_dir, steps)
    if done is None and prefix is not None and not run_dir.exists():
        _start_from(prefix, run_dir)
        print(f"[study] {name} seed {seed}: continues {prefix.name}", flush=True)
    if done is None:
        cmd = train_command(args, planner.overrides(name, seed, steps, run_dir))
        t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") as log:  # a resumed run continues its log
            proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            tail = (run_dir / "train.log").read_text()[-3000:]
            raise SystemExit(f"study: {name} seed {seed} failed ({proc.returncode}):\n{tail}")
        done = {"steps": steps, "train_s": time.perf_counter() - t0}
        if prefix is not None:
            done["continued_from"] = prefix.name
    # The evaluations after training, run again on a finished run evaluated without them or
    # with other settings.
    t0 = time.perf_counter()
    evaluated = "eval_s" not in done
    settings = planner.multimodal_settings(name, seed, steps)
    if args.multimodal and done.get("multimodal_settings") != settings:
        done.update(multimodal(run_dir, seed, settings))
        evaluated = True
    heldout = planner.heldout_settings()
    if heldout and done.get("heldout_settings") != heldout:
        done.update(heldout_sets=whole_heldout(run_dir, heldout), heldout_settings=heldout)
        evaluated = True
    if evaluated:
        done["eval_s"] = time.perf_counter() - t0
        (run_dir / "evals.json").write_text(json.dumps(done, indent=1))
    return done


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def whole_heldout(run_dir: Path, settings: dict) -> dict:
    """Held-out losses of the run's final model on each held-out set of `settings`
    ({"sets": {name: folder}, "num_batches": n}): n micro-batches of packed rows from each, as
    training reads them, with inference and training routing; {name: {"loss_<m>",
    "train_routing_loss_<m>", "tokens_<m>"}}. The evaluation during training scores
    eval.num_batches of the first set only, for the curves."""
    from mm_moe.data.config import SourceConfig
    from mm_moe.eval.heldout import HeldoutEval, heldout_batches
    from mm_moe.eval.pretrained import load_pretrained

    device = _device()
    model = load_pretrained(run_dir, device)
    cfg = model.train_config
    out = {}
    for name, folder in settings["sets"].items():
        source = SourceConfig(urls=folder, format="pairs")
        ev = replace(cfg.eval, sources=[source], num_batches=settings["num_batches"])
        batches = heldout_batches(ev, cfg.data, cfg.tokenizer, 0, 1, cfg.trainer.micro_batch_size)
        scores = HeldoutEval(batches, device)(model)
        out[name] = {
            key.removeprefix("eval/").replace("/", "_"): value
            for key, value in scores.items()
            if key.startswith(("eval/loss_", "eval/train_routing/loss_", "eval/tokens_"))
        }
    return out


def multimodal(run_dir: Path, seed: int, settings: dict) -> dict:
    """Zero-shot classification and text->image accuracy of the run's final model."""
    from mm_moe.eval.config import TextToImageConfig, ZeroShotConfig
    from mm_moe.eval.multimodal import multimodal_evals
    from mm_moe.eval.pretrained import load_pretrained

    model = load_pretrained(run_dir, _device())
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


def train_all(planner: Planner, cwd: Path) -> dict[tuple, dict]:
    """Train and evaluate every run (the long dense run and each model and seed), --jobs at a
    time; {(name, seed, steps): result}."""
    tasks = planner.tasks()
    prefixes = {task: continued_from(planner, *task) for task in tasks}  # Hydra: main thread

    def work(task):
        name, seed, steps = task
        print(f"[study] {name} seed {seed}: {steps} steps", flush=True)
        result = train_and_eval(planner, name, seed, steps, cwd, prefixes[task])
        print(
            f"[study] {name} seed {seed} done: {result['train_s']:.0f}s train, "
            f"{result.get('eval_s', 0):.0f}s evals",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(planner.args.jobs) as pool:
        return dict(zip(tasks, pool.map(work, tasks)))
