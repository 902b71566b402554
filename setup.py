"""Build hook: the wheel carries the prompt templates and the bundled samples as package data
(``pipeline/_assets/{prompts,sample}``), so that ``pip install`` + ``camim demo`` works anywhere.
Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSETS = {"prompts": ROOT / "prompts", "sample": ROOT / "data" / "sample"}


class BuildWithAssets(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "pipeline" / "_assets"
        for name, src in ASSETS.items():
            if src.is_dir():
                shutil.copytree(src, dst / name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithAssets})
