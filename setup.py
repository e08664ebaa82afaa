"""The build step that pyproject.toml cannot express: configs/ (Hydra YAML at the top of the
repository) is copied into the wheel as the package data `mm_moe/configs`, so that a
non-editable install trains from any working directory (mm_moe/cli.py finds it there)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "mm_moe" / "configs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CONFIGS, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
