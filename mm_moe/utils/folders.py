"""Writing a folder that replaces another (an upcycled checkpoint, a Hugging Face export): build
it beside its place, then swap it in, so that a crash at any point leaves a complete folder,
the old or the new, never a half-deleted one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def sibling_dir(out: Path, what: str) -> Path:
    """A fresh hidden folder beside `out` (same filesystem: renames are atomic), named after
    this process; mkdir, not mkdtemp, so the folder keeps the usual permissions."""
    path = out.parent / f".{out.name}.{what}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # left by an earlier process with this pid
    path.mkdir(parents=True)
    return path


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` in place of `out`. The previous `out` is moved aside
    first and deleted only once the new one is in place: a crash between the two renames
    leaves it whole under `.NAME.old-PID/` beside `out`."""
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = sibling_dir(out, "old")
    os.rename(out, trash / out.name)
    os.rename(tmp, out)
    shutil.rmtree(trash)
