"""Every fenced bash block of the README and docs/ marked `<!-- tested -->` runs as written,
at tiny size (wandb off), from a scratch directory: the documented commands work (exit 0).
A block marked `<!-- tested: exit N -->` holds one command that must exit with status N (a
documented error). No tested block may hide an exit status (`||`, `set +e`)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, TORCHRUN, _env

MARK = re.compile(r"<!-- tested(?:: exit (\d+))? -->")
# What would let a failing command pass: `cmd || echo ...`, `cmd || true`, `set +e`.
MASKS = re.compile(r"\|\||\bset \+e\b")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _tested_blocks() -> list[tuple[str, str, int]]:
    """(page:line, script, expected exit status) of every marked block."""
    blocks = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            mark = MARK.fullmatch(line.strip())
            if mark is None:
                continue
            where = f"{page.relative_to(REPO)}:{i + 1}"
            assert lines[i + 1].strip() == "```bash", f"{where}: {line} must precede ```bash"
            end = lines.index("```", i + 2)
            blocks.append((where, "\n".join(lines[i + 2 : end]), int(mark.group(1) or 0)))
    return blocks


def _commands(script: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", "", script)
    return [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def _tiny(script: str) -> str:
    """The commands as a user types them, with this machine's interpreter and no wandb."""
    script = script.replace(".venv/bin/torchrun", TORCHRUN).replace(".venv/bin/python", PYTHON)
    script = re.sub(r"(?<![\w/.])(launch|scripts|data_pipelines)/", rf"{REPO}/\1/", script)
    script = re.sub(r"\\\n\s*", "", script)  # join continued lines
    # after Hydra's flags: its overrides are one run of positional arguments
    train = r"(-m mm_moe\.train(?: --config-(?:dir|name) \S+)*)(?= )"
    return re.sub(train, r"\1 logging.wandb.mode=disabled", script)


BLOCKS = _tested_blocks()


def test_the_docs_mark_commands_to_test():
    assert len(BLOCKS) >= 5


def test_no_tested_block_hides_an_exit_status():
    """`cmd || echo` passes whatever cmd does: a documented failure is marked with its exit
    status instead, one command per block."""
    masked = [where for where, script, _ in BLOCKS if MASKS.search("\n".join(_commands(script)))]
    assert not masked, masked
    for where, script, status in BLOCKS:
        assert status == 0 or len(_commands(script)) == 1, f"{where}: one command per exit mark"


@pytest.mark.parametrize("where, script, status", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_documented_commands_run(tmp_path_factory, where, script, status):
    work = tmp_path_factory.getbasetemp() / "doc_commands"  # shared: later blocks use runs/
    work.mkdir(exist_ok=True)
    env = {**_env(), "PYTHON_BIN": PYTHON, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _tiny(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == status, f"{where}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if status:  # a documented error: its message, not a traceback
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
