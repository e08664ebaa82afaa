"""Secrets (the values of environment variables named like HF_TOKEN, WANDB_API_KEY, *SECRET*,
*PASSWORD*) never reach a terminal or a file: config errors, malformed overrides (exit 2, one
line), Hydra's own errors, tracebacks, the upcycle's config.yaml / meta.json / overlay and
Hydra's multirun.yaml all show `***` instead."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import PYTHON, REPO, TINY, _env

TOKEN = "hf_Zq7distinctTOKENvalue93"  # distinctive: found only where it leaked


def _run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in _env().items() if k not in ("MM_MOE_TRACEBACK", "HYDRA_FULL_ERROR")}
    env = {**base, "HF_TOKEN": TOKEN, **(env or {})}
    return subprocess.run(
        [PYTHON, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _leaks(folder: Path) -> list[str]:
    """Files under `folder` holding the token."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_a_config_error_masks_the_secret():
    proc = _run("mm_moe.train", f"logging.wandb.mode={TOKEN}")
    assert proc.returncode == 2
    assert TOKEN not in proc.stdout + proc.stderr
    assert "logging.wandb.mode='***' is not valid" in proc.stderr


def test_a_malformed_override_exits_2_with_one_line_secrets_masked():
    proc = _run("mm_moe.train", "trainer.max_steps=[1,")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mm_moe.train: error: cannot parse the override")
    assert proc.stderr.count("\n") == 1 and "trainer.max_steps=[1," in proc.stderr
    proc = _run("mm_moe.train", f"trainer.run_dir={TOKEN}[")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr and "trainer.run_dir=***[" in proc.stderr


def test_hydra_errors_and_tracebacks_mask_the_secret(tmp_path):
    # Hydra's own composition error (a missing group option) ...
    proc = _run("mm_moe.train", f"model={TOKEN}")
    assert proc.returncode == 2 and "Could not find 'model/***'" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    # ... and a traceback let through for debugging
    proc = _run(
        "mm_moe.export",
        f"source={tmp_path / TOKEN}",
        f"out={tmp_path / 'out'}",
        env={"MM_MOE_TRACEBACK": "1"},
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


def test_the_files_the_upcycle_writes_hold_no_secret(tmp_path):
    from tests.unit.test_export import _checkpoint

    source = _checkpoint(tmp_path / "dense", {})
    out = tmp_path / "up"
    proc = _run(
        "mm_moe.upcycle",
        f"source={source}",
        f"out={out}",
        "moe.experts_per_modality.mixed=2",
        "moe.router=token_choice",
        # say, a secret pasted into a shard url (a key the upcycle keeps in config.yaml)
        "data.source=webdataset",
        f"data.sources=[{{urls:'pipe:curl -H {TOKEN} x',format:text}}]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "meta.json").is_file()
    assert "***" in (out / "config.yaml").read_text()
    assert _leaks(out) == [] and TOKEN not in proc.stdout + proc.stderr


def test_hydra_multirun_yaml_holds_no_secret(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*TINY, "trainer.max_steps=1", f"logging.wandb.project={TOKEN}"]
    proc = _run("mm_moe.train", "-m", *args, "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging.wandb.project=***" in (sweep / "multirun.yaml").read_text()
    assert (sweep / "1" / "metrics.jsonl").is_file()
    assert _leaks(sweep) == [] and TOKEN not in proc.stdout + proc.stderr

    # a sweep that stops on an error before any job ran
    failed = tmp_path / "failed"
    proc = _run(
        "mm_moe.train", "-m", *args, "model=tiny_dense,nonexistent", f"hydra.sweep.dir={failed}"
    )
    assert proc.returncode == 2 and (failed / "multirun.yaml").is_file()
    assert _leaks(failed) == []


def test_a_config_file_that_is_not_yaml_exits_2_naming_file_and_line(tmp_path):
    """A YAML syntax error in a config file a user wrote is the file form of a malformed
    override: one line with the file and line (it was a traceback of Hydra's frames)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("model:\n  d_model: [\n")
    proc = _run("mm_moe.train", "--config-dir", str(tmp_path), "model=mine")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "a YAML file cannot be read" in proc.stderr and 'mine.yaml", line 3' in proc.stderr


def test_ctrl_c_is_said_once_for_all_ranks(monkeypatch, capsys):
    """Ctrl-C reaches every rank of a torchrun job: rank 0 says it, every rank exits 130."""
    import pytest

    from mm_moe.cli import exits_on_failure

    monkeypatch.delenv("MM_MOE_TRACEBACK", raising=False)
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as end, exits_on_failure("prog", "what next"):
            raise KeyboardInterrupt
        assert end.value.code == 130
        assert ("prog: interrupted (Ctrl-C); what next" in capsys.readouterr().err) is said
