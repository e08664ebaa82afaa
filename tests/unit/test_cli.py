"""Exit statuses of the entry points: the user's mistakes exit 2 with their message alone;
any other failure exits 1 and keeps its traceback (secrets still masked)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from mm_moe.config import ConfigError
from mm_moe.errors import UserError


def _train_failing_with(monkeypatch, capsys, exc_factory, tmp_path):
    import mm_moe.trainer.trainer as loop
    from mm_moe import train

    def run(cfg):
        raise exc_factory()

    monkeypatch.setattr(loop, "run", run)
    monkeypatch.setenv("MY_SECRET_TOKEN", "hunter2-hunter2")
    monkeypatch.delenv("MM_MOE_TRACEBACK", raising=False)
    argv = ["mm_moe.train", "experiment=tiny_dense", f"trainer.run_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    return exit_info.value.code, capsys.readouterr().err


def _torch_value_error():
    try:  # a ValueError raised inside torch: not the user's mistake
        F.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    except ValueError as exc:
        return exc
    raise AssertionError("torch accepted mismatched batch sizes")


def test_a_value_error_from_inside_torch_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    code, err = _train_failing_with(monkeypatch, capsys, _torch_value_error, tmp_path)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "batch_size" in err


def test_a_user_error_exits_2_with_its_message_alone(monkeypatch, capsys, tmp_path):
    make = lambda: UserError("data.sources[0].urls: shard /x.tar does not exist hunter2-hunter2")
    code, err = _train_failing_with(monkeypatch, capsys, make, tmp_path)
    assert code == 2 and "Traceback" not in err
    assert (
        err.strip() == "mm_moe.train: error: data.sources[0].urls: shard /x.tar does not exist ***"
    )


def test_config_and_data_errors_are_user_errors():
    from mm_moe.data.defects import DataError

    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError)
    assert issubclass(UserError, ValueError)  # callers catching ValueError still see them


@pytest.mark.parametrize(
    "module, key",
    [
        ("mm_moe.upcycle", "router_init_std"),
        ("mm_moe.export", "source"),
        ("mm_moe.generate", "max_new_tokens"),
    ],
)
def test_entry_points_answer_help_with_their_keys(module, key):
    """`--help` lists the keys and exits 0 (the upcycle entry parsed it as a Hydra override
    and printed a lexer error)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"  {key}:" in done.stdout, done.stdout


def test_a_missing_group_option_is_one_line_with_the_choices(capsys):
    """Hydra lists a group's options one per line and then its config search path; the
    message is one line with the choices."""
    from hydra.errors import MissingConfigException

    from mm_moe.cli import failure

    text = (
        "In 'train': Could not find 'model/tiny_mom'\n\nAvailable options in 'model':\n"
        "\tdense_1b\n\ttiny_dense\n\ttiny_moma\nConfig search path:\n"
        "\tprovider=hydra, path=pkg://hydra.conf\n\tprovider=main, path=file:///x/configs\n"
    )
    assert failure("mm_moe.train", MissingConfigException(text)) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "mm_moe.train: error: In 'train': Could not find 'model/tiny_mom'; model options: "
        "dense_1b, tiny_dense, tiny_moma"
    )
