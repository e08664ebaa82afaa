"""Every fenced bash block of the README and docs/ marked `<!-- tested -->` runs as written,
at tiny size (wandb off), from a scratch directory: the documented commands work."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, TORCHRUN, _env

MARK = "<!-- tested -->"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _tested_blocks() -> list[tuple[str, str]]:
    """(page:line, script) of every marked block."""
    blocks = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            assert lines[i + 1].strip() == "```bash", f"{page}:{i + 2}: {MARK} must precede ```bash"
            end = lines.index("```", i + 2)
            blocks.append((f"{page.relative_to(REPO)}:{i + 1}", "\n".join(lines[i + 2 : end])))
    return blocks


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


@pytest.mark.parametrize("where, script", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_documented_commands_run(tmp_path_factory, where, script):
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
    assert proc.returncode == 0, f"{where}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
