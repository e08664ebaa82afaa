"""One training run per run folder at a time.

Two runs started into the same `trainer.run_dir` (a command run twice, two terminals) used to
both report success while each replaced the other's metrics.jsonl and checkpoints; the same for
a `checkpoint.dir` two runs share (a sweep given one, or another run's checkpoints/ named),
which is locked too. The main
rank now holds an advisory lock (`flock`) on `<run_dir>/.run.lock` from before it touches the
folder until the run closes; the kernel drops it when the process dies, so a crash leaves no
stale lock. The file names its holder. A file system without locks (Lustre mounted without
`flock`) runs unlocked, with a warning. Runs built again in the same process (notebooks,
benchmarks) share the process's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from mm_moe.errors import UserError

log = logging.getLogger("mm_moe")
LOCK_FILE = ".run.lock"
# resolved run folder -> [open lock file, holders in this process, what acquire made: None,
# "file" (the lock file) or "folder" (the folder and its lock file)]
_HELD: dict[Path, list] = {}


def acquire(run_dir: str | Path, key_name: str = "trainer.run_dir") -> Path:
    """Lock `run_dir` (created if missing) for this process; UserError naming the holder (and
    the config key that chose the folder) when another process has it. Returns the key to
    `release`."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{key_name}={run_dir} cannot be created: {exc.strerror or exc}") from None
    key = run_dir.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    path = run_dir / LOCK_FILE
    made = "folder" if created else "file" if not path.exists() else None
    handle = open(path, "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{key_name}={run_dir} is in use by another run ({holder}); wait for it to end, "
            f"or choose another {key_name}"
        ) from None
    except OSError as exc:  # no locks on this file system
        log.warning("cannot lock %s (%s): runs into the same folder are not detected", path, exc)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
    handle.flush()
    _HELD[key] = [handle, 1, made]
    return key


def release(key: Path | list[Path] | None, tidy: bool = False) -> None:
    """Drop this process's hold on the folder(s) (the lock goes with the last holder). `tidy`
    (a run that failed to start) also removes a folder that `acquire` made, when nothing but
    the lock file is in it: a refused start leaves nothing behind."""
    if isinstance(key, list):
        for one in reversed(key):  # inner folders (checkpoint.dir) first
            release(one, tidy)
        return
    if key is None or key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        handle, _, made = _HELD.pop(key)
        if tidy and made:
            # Unlinked while still held: a run starting now cannot lock the old file.
            (key / LOCK_FILE).unlink(missing_ok=True)
        handle.close()  # closing the file releases the flock
        if tidy and made == "folder":
            with contextlib.suppress(OSError):
                key.rmdir()  # only when empty
