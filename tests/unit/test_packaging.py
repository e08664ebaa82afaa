"""A non-editable install trains: the wheel ships the configs, and an installed mm_moe finds
them from any working directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("mm_moe", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run([*cmd, "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("mm_moe-*.whl")
    return wheel


def test_wheel_ships_configs_and_an_install_finds_them_anywhere(tmp_path):
    wheel = _wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "mm_moe/configs/train.yaml" in names
    assert {n for n in names if n.startswith("mm_moe/configs/")} >= {
        "mm_moe/configs/" + p.relative_to(REPO / "configs").as_posix()
        for p in (REPO / "configs").rglob("*.yaml")
    }
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    proc = subprocess.run([*pip, "--target", str(target), str(wheel)], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # -S: no site processing, so the checkout's editable install is not on the path; the
    # dependencies come from site-packages, appended after the installed wheel.
    script = (
        "import sys; "
        f"sys.path[:0] = [{str(target)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "from hydra import compose, initialize_config_dir\n"
        "from mm_moe.cli import CONFIG_DIR\n"
        "from mm_moe.train import build_config\n"
        "with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):\n"
        "    cfg = build_config(compose('train', overrides=['experiment=tiny_moma']))\n"
        "print(CONFIG_DIR, cfg.name)\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=work, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config_dir, name = proc.stdout.split()
    assert Path(config_dir) == target / "mm_moe" / "configs" and name == "tiny_moma"


def test_no_test_skips_itself_for_a_missing_main_dependency():
    """A broken install of a main dependency must fail the tests that need it, not skip them
    silently: no `importorskip` of anything in [project].dependencies."""
    import re

    # pyproject's [project].dependencies (tomllib is Python 3.11+; the project takes 3.10)
    block = re.search(r"(?ms)^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text())
    deps = re.findall(r'^\s*"([^"]+)"', block.group(1), flags=re.M)
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("-", "_") for d in deps}
    assert {"torch", "transformers", "webdataset"} <= names
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for module in re.findall(r"importorskip\(\s*['\"]([\w.]+)['\"]", path.read_text()):
            if module.split(".")[0].lower() in names:
                found.append(f"{path.relative_to(REPO)}: {module}")
    assert not found, found
