"""Nothing a run loads can execute code, and secrets never reach its files or logs."""

from __future__ import annotations

import json
import os

import torch

from tests.helpers import PYTHON, train


class _Payload:
    """A pickle that would create `marker` when unpickled with full pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_and_does_not_run(tmp_path):
    step_dir = tmp_path / "planted" / "step_00000002"
    step_dir.mkdir(parents=True)
    meta = {"format_version": 2, "step": 2, "world_size": 1, "scheduler": {}, "data": {}}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    marker = tmp_path / "pwned"
    torch.save({"embed.weight": _Payload(str(marker))}, step_dir / "model.pt")

    run_dir = tmp_path / "run"
    proc = train(run_dir, "trainer.max_steps=4", f"checkpoint.resume={step_dir}", check=False)
    assert proc.returncode != 0
    assert f"cannot load {step_dir / 'model.pt'}" in proc.stderr, proc.stderr[-3000:]
    assert "weights_only" in proc.stderr
    assert not marker.exists()


def test_secrets_reach_no_file_and_no_log(tmp_path):
    secrets = {
        "WANDB_API_KEY": "wk" + "0123456789abcdef" * 2 + "01234567",
        "HF_TOKEN": "hf_SeCrEtToKeNvAlUe123456",
        "MY_SERVICE_PASSWORD": "hunter2-but-longer",
    }
    run_dir = tmp_path / "run"
    launcher = ["env", *(f"{k}={v}" for k, v in secrets.items()), PYTHON, "-m", "mm_moe.train"]
    proc = train(
        run_dir,
        "trainer.max_steps=2",
        "checkpoint.interval=2",
        "logging.wandb.mode=offline",
        # A secret that lands in the config (a url with a token, say) is masked everywhere.
        f"logging.wandb.name=run-{secrets['HF_TOKEN']}",
        launcher=launcher,
    )
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # wandb wrote its offline run
    for path in files:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} found in {path}"
    for name, value in secrets.items():
        assert value not in proc.stdout + proc.stderr, name
    config = (run_dir / "checkpoints" / "step_00000002" / "config.yaml").read_text()
    assert "name: run-***" in config


def test_failed_run_prints_no_secret(tmp_path):
    """Hydra prints a failed job's overrides; the entry point reports failures itself, masked."""
    token = "hf_FaIlEdRuNsEcReT98765"
    launcher = ["env", f"HF_TOKEN={token}", PYTHON, "-m", "mm_moe.train"]
    proc = train(
        tmp_path / "run",
        "data.source=webdataset",
        f"data.sources=[{{urls: {tmp_path}/missing-{token}, format: text}}]",
        launcher=launcher,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mm_moe.train: error:" in proc.stderr and "missing-***" in proc.stderr
    assert token not in proc.stdout + proc.stderr


def test_scrub_masks_secret_values_anywhere():
    from mm_moe.utils.scrub import scrub, secret_values

    env = {"HF_TOKEN": "hf_abcdefgh12345", "PATH": "/usr/bin:/bin", "SOME_KEY": "short"}
    values = secret_values(env)
    assert values == ["hf_abcdefgh12345"]  # PATH is not secret-looking; "short" is too short
    cfg = {"data": {"sources": [{"urls": "pipe:curl -H 'token: hf_abcdefgh12345' u"}]}, "n": 3}
    assert scrub(cfg, values) == {
        "data": {"sources": [{"urls": "pipe:curl -H 'token: ***' u"}]},
        "n": 3,
    }
