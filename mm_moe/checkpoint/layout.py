"""On-disk layout: one directory per step, written under a temporary name and renamed into
place, and a `latest` pointer updated only after the rename.

    <dir>/step_00000010/{meta.json, model.pt, optimizer.pt, rng.pt, config.yaml, vocab.yaml}
    <dir>/latest            -> "step_00000010"

A directory named step_* is complete by construction (rename is atomic); a crash leaves at most
a `.tmp-step_*` directory, which is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

from mm_moe.errors import UserError

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
CONFIG = "config.yaml"
VOCAB = "vocab.yaml"  # where text, special and image ids live (checkpoints since format 2)
_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_step_dir_name(name: str) -> bool:
    """Whether `name` is a run's step folder's (step_XXXXXXXX), not a folder named by a user
    (an upcycled checkpoint's)."""
    return _STEP_RE.match(name) is not None


def step_of(step_dir: Path) -> int:
    """The step a step directory (`step_dir_name`) holds."""
    m = _STEP_RE.match(step_dir.name)
    assert m is not None, step_dir
    return int(m.group(1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def new_tmp_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(root: Path, tmp: Path, step: int) -> Path:
    """Rename a fully written tmp directory into place, then move the `latest` pointer."""
    fsync_tree(tmp)
    final = root / step_dir_name(step)
    trash = None
    if final.exists():  # the same step saved again (e.g. after a rollback): replace it
        trash = root / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    with open(pointer_tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def read_tensors(path: Path):
    """A checkpoint file, read without running code: tensors and plain values only. Mapped,
    not read: the ranks of a node share its pages, and each reads only what it takes."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # torch's legacy (not zip) format cannot be mapped
            if "mmap" not in str(exc) or not Path(path).is_file():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            why = (
                "checkpoint files must hold only tensors and plain values (they are read with "
                "weights_only=True, which never runs code)"
            )
        else:
            state = "missing" if isinstance(exc, FileNotFoundError) else "damaged or truncated"
            why = f"The file is {state}; {_other_steps(Path(path).parent)}"
        first_line = str(exc).splitlines()[0].rstrip(" .") if str(exc) else ""
        raise UserError(
            f"cannot load {path}: {exc.__class__.__name__}: {first_line}. {why}"
        ) from exc


def _other_steps(step_dir: Path) -> str:
    """Where to resume instead of a step with a bad file: the complete steps beside it."""
    others = [
        step_dir_name(s)
        for s in complete_steps(step_dir.parent)
        if step_dir_name(s) != step_dir.name
    ]
    if not others:
        return "resume from another checkpoint (checkpoint.resume=PATH)"
    return (
        f"resume from a complete step beside it ({', '.join(others[-3:])} in {step_dir.parent}: "
        "checkpoint.resume=auto takes the newest, skipping damaged ones)"
    )


def read_meta(step_dir: Path) -> dict:
    """A step's meta.json; a file that is not a JSON object (damaged after the save: a disk
    error, an edit) is a UserError naming it."""
    path = Path(step_dir) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        meta = exc
    if isinstance(meta, dict):  # the counts it holds are whole numbers, where it has them
        bad = [k for k in ("step", "world_size", "format_version") if k in meta]
        bad = [f"{k}={meta[k]!r}" for k in bad if type(meta[k]) is not int or meta[k] < 0]
        meta = f"not a count: {', '.join(bad)}" if bad else meta
    if not isinstance(meta, dict):
        raise UserError(
            f"{path} is damaged ({meta}): a checkpoint's {META} must be the JSON object the "
            "save wrote. Resume from another step (checkpoint.resume=PATH of a step_XXXXXXXX "
            "directory) or checkpoint.resume=auto, which skips damaged steps"
        )
    return meta


def read_config(step_dir: Path, required: bool = True) -> dict | None:
    """A step's config.yaml as the run wrote it; None where there is none and it is not
    `required`. A missing (when required) or damaged file is a UserError naming it."""
    import yaml

    path = Path(step_dir) / CONFIG
    if not path.is_file():
        if not required:
            return None
        raise UserError(
            f"{path} is missing: a checkpoint's {CONFIG} holds the config its model was built "
            "from. Use a whole step_XXXXXXXX directory as the save wrote it"
        )
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        config = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not isinstance(config, dict):
        raise UserError(
            f"{path} is damaged ({config}): it must be the YAML mapping the save wrote. Use "
            "another step (checkpoint.resume=PATH of a step_XXXXXXXX directory)"
        )
    return config


_warned_incomplete: set[str] = set()  # each skipped step (or bad pointer) said once per process


def _warn_once(path: Path, message: str) -> None:
    if str(path) not in _warned_incomplete:
        _warned_incomplete.add(str(path))
        log.warning(message)


def _skipped(step_dir: Path, why: str) -> None:
    _warn_once(step_dir, f"skipping {step_dir} as incomplete: {why}")


def _is_complete(step_dir: Path) -> bool:
    """Holds a readable meta.json (written last) and the whole tensor files a save of its kind
    writes; a damaged one is skipped with a warning."""
    if not (step_dir / META).is_file():
        return False
    try:
        meta = read_meta(step_dir)
    except UserError as exc:
        _skipped(step_dir, str(exc))
        return False
    why = _damaged_file(step_dir, meta)
    if why is not None:
        _skipped(step_dir, why)
        return False
    return True


def _damaged_file(step_dir: Path, meta: dict) -> str | None:
    """Why a tensor file of a saved step cannot be whole (missing, or cut short: a disk error,
    a copy interrupted), or None. torch.save writes zip archives, whose directory sits at the
    end: reading the tail finds a truncation without loading the tensors."""
    if "scheduler" in meta:  # a training save
        names = ("model.pt", "optimizer.pt", "rng.pt")
    elif meta.get("weights_only"):  # an upcycled or imported model
        names = ("model.pt",)
    else:
        return None
    for name in names:
        path = step_dir / name
        if not path.is_file():
            return f"its {name} is missing"
        if not zipfile.is_zipfile(path):
            return f"its {name} is damaged or truncated (not a whole torch.save archive)"
    return _damaged_config(step_dir) if "scheduler" in meta else None


def _damaged_config(step_dir: Path) -> str | None:
    """Why a training save's config.yaml cannot be the one it wrote (missing, not YAML, or cut
    short: a cut file can still parse, into values the model config refuses), or None. Resume
    compares the model with it: without it, another model would train on without a word."""
    from mm_moe.config.legacy import upgrade_saved_config
    from mm_moe.config.validate import from_dict
    from mm_moe.model.config import ModelConfig  # a leaf: no model code

    try:
        model = upgrade_saved_config(read_config(step_dir)).get("model")
        if not isinstance(model, dict):
            return f"its {CONFIG} holds no model config"
        from_dict(ModelConfig, model, "model")
    except UserError as exc:
        return f"its {CONFIG} is missing or damaged ({str(exc).splitlines()[0][:200]})"
    return None


def step_folders(root: Path) -> list[str]:
    """The names of every step folder in `root`, complete or not, in step order (a folder is
    published whole, so one that is not complete now was damaged after its save)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir())


def complete_steps(root: Path) -> list[int]:
    return [int(name[len("step_") :]) for name in step_folders(root) if _is_complete(root / name)]


def latest_step_dir(root: Path) -> Path | None:
    """The checkpoint `latest` points at; falls back to the newest complete step directory
    when the pointer is missing or names something that is not there (said)."""
    pointer = root / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else None
    if name is not None:
        target = root / name
        if _STEP_RE.match(name) and _is_complete(target):
            return target
        newest = ": taking the newest complete step"
        if not _STEP_RE.match(name):
            _warn_once(pointer, f"{pointer} holds {name!r}, not a step folder's name{newest}")
        elif not target.is_dir():
            _warn_once(pointer, f"{pointer} names {name}, which is not there{newest}")
        elif not (target / META).is_file():
            _skipped(target, f"{LATEST} names it, but it holds no {META} (removed or unwritten)")
    steps = complete_steps(root)
    if name is None and steps:  # a save writes it: removed, or a copy without it
        _warn_once(
            pointer,
            f"{root} has no {LATEST} pointer: taking the newest complete step, "
            f"{step_dir_name(steps[-1])} (after a rollback that may be the abandoned line's)",
        )
    if name and (named := _STEP_RE.match(name)):
        # Before the step `latest` named: its own line (a rewound run keeps an older line's
        # higher steps, which are not where it stood).
        steps = [s for s in steps if s <= int(named.group(1))] or steps
    return root / step_dir_name(steps[-1]) if steps else None


def prune(root: Path, keep_last: int, current: int | None = None) -> None:
    """Remove unfinished writes and all but the newest `keep_last` steps up to `current` (the
    step just written). Steps after `current` are another line of the run, from before a
    resume at an earlier step: never counted against this line's (which would remove the step
    just written); `newer_steps` names them at the resume."""
    for tmp in root.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return
    steps = [s for s in complete_steps(root) if current is None or s <= current]
    for step in steps[:-keep_last]:
        shutil.rmtree(root / step_dir_name(step), ignore_errors=True)


def newer_steps(root: Path, step: int) -> list[int]:
    """Complete steps after `step` in `root`."""
    return [s for s in complete_steps(root) if s > step]


def remove_all(root: Path) -> None:
    """Delete every checkpoint in `root` (a fresh run with checkpoint.overwrite=true)."""
    if (root / LATEST).exists():
        (root / LATEST).unlink()
    for p in root.glob("step_*"):
        shutil.rmtree(p, ignore_errors=True)
    prune(root, keep_last=0)


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The step directory to resume from, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_step_dir(root)
    path = Path(resume)
    if (path / META).is_file():
        return path
    if path.name == LATEST and path.is_file():  # the pointer file itself
        path = path.parent
    for folder in (path, path / "checkpoints"):  # a checkpoint folder, or a run folder
        found = latest_step_dir(folder) if folder.is_dir() else None
        if found is not None:
            return found
    raise UserError(
        f"checkpoint.resume={resume!r}: no complete checkpoint there (expected a step_XXXXXXXX "
        f"directory holding {META}, a directory with a '{LATEST}' pointer, or a run folder "
        "holding checkpoints/); "
        "valid values are none, auto or such a path"
    )
