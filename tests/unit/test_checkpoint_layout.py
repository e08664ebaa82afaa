"""Atomic step directories and the latest pointer."""

from __future__ import annotations

import pytest

from mm_moe.checkpoint import layout


def _save(root, step):
    tmp = layout.new_tmp_dir(root, step)
    (tmp / "model.pt").write_bytes(b"x")
    (tmp / layout.META).write_text("{}")
    return layout.publish(root, tmp, step)


def test_publish_moves_latest_and_prune_keeps_last(tmp_path):
    for step in (5, 10, 15):
        _save(tmp_path, step)
    assert (tmp_path / "latest").read_text().strip() == "step_00000015"
    layout.prune(tmp_path, keep_last=2)
    assert layout.complete_steps(tmp_path) == [10, 15]


def test_unfinished_tmp_dir_is_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 5)
    tmp = layout.new_tmp_dir(tmp_path, 10)
    (tmp / "model.pt").write_bytes(b"partial")
    assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000005"
    assert layout.resolve_resume("auto", tmp_path) == tmp_path / "step_00000005"
    _save(tmp_path, 10)
    layout.prune(tmp_path, keep_last=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_dangling_pointer_falls_back_to_newest_complete(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    (tmp_path / "latest").write_text("step_00000099\n")
    assert layout.latest_step_dir(tmp_path) == tmp_path / "step_00000010"


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 5)
    final = _save(tmp_path, 5)
    assert final.is_dir() and not list(tmp_path.glob(".old-*"))


def test_resume_values(tmp_path):
    assert layout.resolve_resume("none", tmp_path) is None
    assert layout.resolve_resume("auto", tmp_path) is None  # nothing yet: fresh start
    step_dir = _save(tmp_path, 5)
    assert layout.resolve_resume(str(step_dir), tmp_path / "elsewhere") == step_dir
    assert layout.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == step_dir
    with pytest.raises(ValueError, match="checkpoint.resume"):
        layout.resolve_resume(str(tmp_path / "missing"), tmp_path)
