"""The repository tree is also the import tree: beekeeper/<sub> links to the folder the package maps it to.

Path-based tools (mypy in `make lint`, pyright, editors) resolve `beekeeper.operator` through these
symlinks; setuptools packages from `[tool.setuptools.package-dir]`. The two must name the same folders.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_symlinks_match_package_dir() -> None:
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mapped = {name.removeprefix("beekeeper."): folder for name, folder in package_dir.items() if name != "beekeeper"}
    links = {p.name: os.readlink(p) for p in (ROOT / "beekeeper").iterdir() if p.is_symlink()}
    assert links == {sub: f"../{folder}" for sub, folder in mapped.items()}
    assert all((ROOT / "beekeeper" / sub).resolve() == ROOT / folder for sub, folder in mapped.items())
