"""A checkpoint folder is data, not code: `--config-dir <checkpoint> experiment=upcycled` reads
the overlay with a safe loader and refuses, naming the key, anything but `model`, `moe` and
`tokenizer` (mm_moe/config/overlay.py). Planted commands never run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mm_moe.config.overlay import read_overlay
from mm_moe.errors import UserError
from tests.helpers import PYTHON, REPO, _env

HEADER = "# @package _global_\n"


def _checkpoint(root: Path, overlay: str) -> Path:
    """A folder that looks like an upcycled checkpoint, with `overlay` as its overlay."""
    root.mkdir()
    (root / "meta.json").write_text(json.dumps({"format_version": 2, "step": 0}))
    (root / "experiment").mkdir()
    (root / "experiment" / "upcycled.yaml").write_text(overlay)
    return root


def _train_from(ckpt: Path, run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "mm_moe.train", "--config-dir", str(ckpt), "experiment=upcycled"]
    cmd += ["trainer.max_steps=1", f"trainer.run_dir={run_dir}", "logging.wandb.mode=disabled"]
    cmd += ["data.num_workers=0", "trainer.global_batch_size=8", "trainer.micro_batch_size=8"]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _planted_pipe(tmp_path: Path) -> tuple[Path, str, str]:
    """(marker the command would write, overlay, the refused key): a data source whose
    `pipe:` URL is a shell command."""
    marker = tmp_path / "pipe_ran"
    overlay = HEADER + (
        "model: {d_model: 64}\n"
        "data:\n"
        "  source: webdataset\n"
        "  num_streams: 1\n"
        f"  sources: [{{urls: 'pipe:touch {marker}; cat /dev/null', format: text}}]\n"
    )
    return marker, overlay, "data"


def _planted_target(tmp_path: Path) -> tuple[Path, str, str]:
    """A Hydra callback, instantiated (called) as Hydra starts the run. Hydra's allowlist
    stops os.system, not shutil.copy: a file written anywhere (a shell's rc file, say) is
    code run later."""
    marker, payload = tmp_path / "target_ran", tmp_path / "payload"
    payload.write_text("echo planted\n")
    overlay = HEADER + (
        "hydra:\n"
        "  callbacks:\n"
        "    planted:\n"
        "      _target_: shutil.copy\n"
        f"      _args_: ['{payload}', '{marker}']\n"
    )
    return marker, overlay, "hydra"


@pytest.mark.parametrize("plant", [_planted_pipe, _planted_target], ids=["pipe", "target"])
def test_a_command_planted_in_a_checkpoint_overlay_is_refused_and_never_runs(tmp_path, plant):
    marker, overlay, key = plant(tmp_path)
    proc = _train_from(_checkpoint(tmp_path / "ckpt", overlay), tmp_path / "run")
    assert not marker.exists(), f"the checkpoint's planted {key} command ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"key '{key}' is refused" in proc.stderr and "upcycled.yaml" in proc.stderr


def test_training_an_upcycled_shape_without_its_weights_is_warned_about(tmp_path):
    """`--config-dir FOLDER experiment=upcycled` without checkpoint.resume=FOLDER trains the
    upcycled shape from random weights: said before the run starts, naming the fix."""
    ckpt = _checkpoint(tmp_path / "ckpt", HEADER + "model: {d_model: 64}\n")
    proc = _train_from(ckpt, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"random weights. To train the upcycled weights, pass checkpoint.resume={ckpt}" in (
        proc.stdout + proc.stderr
    )


@pytest.mark.parametrize(
    "body, named",
    [
        ("model:\n  _target_: os.system\n", "model._target_"),
        (
            "moe:\n  experts_per_modality: {_target_: os.system}\n",
            "moe.experts_per_modality._target_",
        ),
        ("tokenizer:\n  path: ${oc.env:HOME}\n", "tokenizer.path"),
        ("defaults:\n  - override /data: webdataset\n", "defaults"),
        ("name: anything\n", "name"),
    ],
)
def test_an_overlay_sets_plain_model_moe_and_tokenizer_values_only(tmp_path, body, named):
    path = tmp_path / "upcycled.yaml"
    path.write_text(HEADER + body)
    with pytest.raises(UserError, match=f"{path}: key '{named}'"):
        read_overlay(path)


def test_an_overlay_must_be_global_and_yaml(tmp_path):
    path = tmp_path / "upcycled.yaml"
    path.write_text("\n# @package data\nmodel: {d_model: 64}\n")  # Hydra skips the blank line
    with pytest.raises(UserError, match="@package data"):
        read_overlay(path)
    path.write_text(HEADER + "model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match="not a readable YAML overlay"):
        read_overlay(path)


def test_the_overlay_the_upcycle_writes_is_accepted(tmp_path):
    from mm_moe.config import TrainConfig, to_dict
    from mm_moe.upcycle.upcycling import _overlay

    cfg = to_dict(TrainConfig())
    path = tmp_path / "upcycled.yaml"
    path.write_text(_overlay(cfg))
    assert read_overlay(path) == {k: cfg[k] for k in ("model", "moe", "tokenizer")}


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=upcycled"],
        ["experiment=tiny_dense,upcycled"],  # a sweep (-m)
        ["experiment=glob(up*)"],  # a glob sweep over the group's options
        ["+experiment=[upcycled]"],  # a multi-select
    ],
    ids=["choice", "sweep", "glob", "multi-select"],
)
def test_every_way_to_choose_a_checkpoint_overlay_is_checked(tmp_path, overrides):
    from mm_moe.cli import CONFIG_DIR
    from mm_moe.config.overlay import check_config_dir

    ckpt = _checkpoint(tmp_path / "ckpt", HEADER + "data: {source: webdataset}\n")
    with pytest.raises(UserError, match="key 'data' is refused"):
        check_config_dir(str(ckpt), overrides, None, CONFIG_DIR)


def test_a_users_own_config_dir_may_still_set_data(tmp_path):
    from mm_moe.cli import CONFIG_DIR
    from mm_moe.config.overlay import check_config_dir

    mine = tmp_path / "configs"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "mine.yaml").write_text("defaults: [webdataset]\nsources: []\n")
    check_config_dir(str(mine), ["data=mine"], None, CONFIG_DIR)  # not a checkpoint: as before


def test_a_users_edited_copy_of_a_preset_under_its_name_is_refused(tmp_path):
    """Hydra reads the shipped configs first: an edited copy named as the preset would never
    be read. Refused, naming the file and a name that is read; an identical copy passes."""
    from mm_moe.cli import CONFIG_DIR, compose
    from mm_moe.config.overlay import check_config_dir

    mine = tmp_path / "configs"
    (mine / "moe").mkdir(parents=True)
    shipped = (Path(CONFIG_DIR) / "moe" / "moma_4t4i_ec.yaml").read_text()
    (mine / "moe" / "moma_4t4i_ec.yaml").write_text(shipped)
    check_config_dir(str(mine), ["experiment=tiny_moma"], None, CONFIG_DIR)
    edited = shipped.replace("{text: 4, image: 4}", "{text: 2, image: 6}")
    assert edited != shipped
    (mine / "moe" / "moma_4t4i_ec.yaml").write_text(edited)
    with pytest.raises(UserError, match="moe/moma_4t4i_ec.yaml has the name of a shipped") as err:
        compose(["experiment=tiny_moma"], config_dir=str(mine))
    assert "choose it: moe=moma_4t4i_ec_mine" in str(err.value)
    (mine / "moe" / "moma_4t4i_ec.yaml").rename(mine / "moe" / "moma_4t4i_ec_mine.yaml")
    cfg = compose(["experiment=tiny_moma", "moe=moma_4t4i_ec_mine"], config_dir=str(mine))
    assert cfg.moe.experts_per_modality == {"text": 2, "image": 6}
