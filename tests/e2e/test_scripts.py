"""Every script in scripts/ and data_pipelines/ runs in CI, as a command, at its smallest size:
the ones no other test runs run here; the table names the test file that runs each other one
(and a check holds the table to the folders and to those files)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO, _env

# script -> the test file that runs it as a command (checked to name it).
ELSEWHERE = {
    "scripts/bench_attention.py": "tests/e2e/test_gpu_check.py",  # gpu_check --smoke
    "scripts/bench_moe.py": "tests/e2e/test_gpu_check.py",
    "scripts/bench_step.py": "tests/e2e/test_gpu_check.py",
    "scripts/gpu_check.py": "tests/e2e/test_gpu_check.py",
    "scripts/study_moma.py": "tests/e2e/test_eval_study.py",
    "scripts/tiny_hf_model.py": "tests/e2e/test_doc_commands.py",  # README's tested block
    "scripts/torch_setup.sh": "tests/unit/test_gpu_setup.py",
    "data_pipelines/build_demo_corpus.py": "tests/e2e/test_doc_commands.py",  # upcycling.md
    "data_pipelines/build_study_corpus.py": "tests/unit/test_study_corpus.py",
    "data_pipelines/build_text.py": "tests/unit/test_data_builders.py",
}
# What the doc-command test runs lives in the docs' tested blocks.
DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Imported by the scripts, never run: no `__main__`.
MODULES = {"data_pipelines/demo_corpus.py", "data_pipelines/__init__.py"}

# script -> (arguments at its smallest size, text its output must contain)
HERE = {
    "scripts/bench_checkpoint.py": (["d_model=32", "n_layers=1", "repeats=1"], "async blocking"),
    "scripts/bench_data.py": (["--smoke"], "ratio:"),
    "scripts/bench_ep.py": (["--smoke", "--json"], '"ratios"'),
    "scripts/bench_routing_health.py": (["--reps=2", "--batch=2", "--threads=1"], "ratio"),
    "scripts/model_size.py": (["--seq-len=128"], "moma_4t4i_1.4b"),
    "scripts/precompile_imports.py": ([], "precompiled the imports"),
}
SEPARATE = {  # run by their own tests below
    "scripts/demo_report.py",
    "data_pipelines/build_pairs.py",
    "data_pipelines/pretokenize.py",
    "data_pipelines/build_interleaved.py",
}


def _scripts() -> set[str]:
    found = set()
    for folder in ("scripts", "data_pipelines"):
        for path in (REPO / folder).iterdir():
            if path.suffix in (".py", ".sh") and path.is_file():
                found.add(f"{folder}/{path.name}")
    return found


def test_every_script_is_run_by_a_test():
    listed = set(ELSEWHERE) | set(HERE) | SEPARATE | MODULES
    assert _scripts() - listed == set(), "scripts no test runs: add them to this file's table"
    assert listed - MODULES <= _scripts(), "the table names scripts that are gone"
    for module in MODULES & _scripts():
        assert "__main__" not in (REPO / module).read_text(), f"{module} is a script now"
    docs = "\n".join(page.read_text() for page in DOC_PAGES)
    for script, test in ELSEWHERE.items():
        text = (REPO / test).read_text()
        if test.endswith("test_doc_commands.py"):
            text = docs
        assert Path(script).name in text, f"{test} does not run {script}"


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [PYTHON, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", sorted(HERE))
def test_script_runs_at_its_smallest_size(script):
    args, expected = HERE[script]
    proc = _run([script, *args])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-2000:]
    if "--json" in args:
        json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["scripts/bench_checkpoint.py", "scripts/precompile_imports.py"])
def test_help_prints_what_a_key_value_script_does_and_runs_nothing(script):
    """--help exited 1 on bench_checkpoint ("unknown argument '--help'"); precompile_imports
    ignored it and ran, writing bytecode."""
    proc = _run([script, "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = (REPO / script).read_text().split('"""')[1].splitlines()[0]
    assert first in proc.stdout and HERE[script][1] not in proc.stdout


def test_pairs_pretokenize_and_interleaved_builders_run_as_commands(tmp_path):
    from tests.data_shards import caption, image_bytes

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(image_bytes(i))
        (photos / f"{i}.txt").write_text(caption(i))
    pairs = _run(["data_pipelines/build_pairs.py", f"input={photos}", f"output={tmp_path / 'p'}"])
    assert pairs.returncode == 0, pairs.stderr[-3000:]
    pattern = pairs.stdout.split("wrote ")[1].split()[0]
    tokens = _run(
        [
            "data_pipelines/pretokenize.py",
            f"input={pattern}",
            "format=pairs",
            f"output={tmp_path / 't'}",
            "tokenizer.image_size=16",
            "tokenizer.grid=4",
            "processes=1",
        ]
    )
    assert tokens.returncode == 0, tokens.stderr[-3000:]
    assert "format: tokens" in tokens.stdout and (tmp_path / "t" / "vocab.yaml").is_file()
    doc = {"content": [{"type": "text", "text": "a"}, {"type": "image", "path": "photos/0.png"}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    docs = _run(
        [
            "data_pipelines/build_interleaved.py",
            f"input={tmp_path / 'docs.jsonl'}",
            f"output={tmp_path / 'i'}",
        ]
    )
    assert docs.returncode == 0, docs.stderr[-3000:]
    assert "format: interleaved" in docs.stdout


def test_demo_report_runs_on_a_two_step_demo_run(tmp_path, demo_assets):
    tok_dir, heldout = demo_assets
    corpus = heldout.parent
    run_dir = tmp_path / "run"
    sources = ",".join(
        f"{{urls:{corpus / name},format:{name},weight:1}}" for name in ("pairs", "text")
    )
    train = _run(
        [
            "-m",
            "mm_moe.train",
            "experiment=demo",
            f"data.sources=[{sources}]",
            f"tokenizer.path={tok_dir}",
            f"eval.sources=[{{urls:{heldout},format:pairs}}]",
            f"eval.text_to_image.cache_dir={tmp_path / 'cache'}",
            "eval.text_to_image.classifier_steps=5",
            f"trainer.run_dir={run_dir}",
            "trainer.max_steps=2",
            "trainer.global_batch_size=8",  # a multiple of the demo's 8 data streams
            "trainer.micro_batch_size=4",
            "data.num_workers=0",
            "data.seq_len=64",
            "eval.interval=2",
            "checkpoint.interval=2",
            "logging.wandb.mode=disabled",
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    report = _run(
        [
            "scripts/demo_report.py",
            str(run_dir),
            "--zero-shot=4",
            "--captions=4",
            "--per-digit=1",
            "--grid=1",
            "--rerank=1",
        ]
    )
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-3000:]
    written = json.loads((run_dir / "samples" / "report.json").read_text())
    assert {"zero_shot_accuracy", "caption_accuracy", "text_to_image_accuracy"} <= set(written)
    assert written["steps"] == 2 and written["heldout_loss"]["step"] == 2
    assert list((tmp_path / "cache").glob("judge_*.pt"))  # the run's judge cache, reused


def test_demo_report_takes_the_loss_of_its_checkpoint_and_runs_without_metrics(tmp_path, capsys):
    """The held-out loss reported is the checkpoint's (not a later evaluation's, when the run
    went on past it), and a folder without metrics.jsonl (a copied checkpoint) is warned about
    up front instead of failing after the evaluations."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_report", REPO / "scripts/demo_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report._metrics(tmp_path) == []
    assert f"no {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err
    rows = [{"step": s, "loss": 1.0} for s in range(1, 7)]
    rows += [{"step": s, "eval/loss_text": s, "eval/loss_image": -s} for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert report._heldout_loss(report._metrics(tmp_path), 5) == {
        "step": 4,
        "text": 4,
        "image": -4,
    }
    assert report._heldout_loss(rows, 1) == {}
    # a held-out set without images: no image loss, said without it (a TypeError at the end)
    text_only = {"step": 4, "text": 2.5, "image": None}
    assert report._heldout_text(text_only) == "; held-out loss at step 4: text 2.500"
    assert report._heldout_text({}) == ""


def test_bench_step_profiles_a_case_and_counts_its_moe_layer_ops():
    """bench_step.py --profile: the profiler's table and the op counts of docs/benchmarks.md.
    An unlogged step's MoE layer runs fewer ops than a logged one (no statistics)."""
    proc = _run(["scripts/bench_step.py", "--smoke", "--cases=moma_ec", "--profile=moma_ec"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Self CPU" in proc.stdout and "aten::" in proc.stdout
    counts = {}
    for line in proc.stdout.splitlines():
        if line.startswith("# aten ops of one MoE layer"):
            counts[line.split("stats=")[1].split(":")[0]] = int(line.rsplit(":", 1)[1])
    assert set(counts) == {"True", "False"}, proc.stdout[-2000:]
    assert 0 < counts["False"] < counts["True"]


@pytest.mark.parametrize("script", ["bench_attention.py", "bench_moe.py", "bench_step.py"])
def test_benchmarks_refuse_cuda_where_there_is_none(script):
    """--device cuda without CUDA: the usage error (exit 2) that says so, not a traceback from
    deep inside torch after the benchmark started."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(
        [PYTHON, f"scripts/{script}", "--device", "cuda", "--smoke"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--device cuda: CUDA is not available on this machine" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_demo_report_without_an_image_decoder_scores_image_to_text(capsys):
    """Chameleon's VQGAN has no published decoder: the judge of text->image cannot see the
    generated images. The report failed after the image->text work, keeping none of it; now
    text->image is not scored, said, and the rest reported."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("demo_report", REPO / "scripts/demo_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def never(*args):
        raise AssertionError("the judge needs decoded images")

    report._judge_beside = never
    report.zero_shot_classify = lambda *a: {"accuracy": 0.5, "num_images": 4}
    report.caption_accuracy = lambda *a: {"accuracy": 0.25, "captions": ["a"], "correct": [1]}
    tok = SimpleNamespace(image=SimpleNamespace(can_decode=False))
    cfg = SimpleNamespace(
        eval=SimpleNamespace(
            zero_shot=SimpleNamespace(labels=["0", "1"], templates=["{label}"], batch_images=2)
        )
    )
    args = SimpleNamespace(zero_shot=4, captions=1)
    got = report._evaluate(None, tok, cfg, [], args, None)
    assert got["zero_shot_accuracy"] == 0.5 and got["caption_accuracy"] == 0.25
    assert got["text_to_image_accuracy"] is None and got["judge_accuracy"] is None
    got.update(steps=3, tokens_per_s=None, heldout_loss={}, wall_s=None)
    report._print(got, ["a"], Path("/out"), Path("/run"), None)
    assert (
        "text -> image: not scored (the image tokenizer has no decoder" in capsys.readouterr().out
    )
    assert report._percent(None) == "-"


def test_model_size_names_an_unknown_preset_in_one_line():
    proc = _run(["scripts/model_size.py", "bogus"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown preset(s) ['bogus']: configs/model holds" in proc.stderr
