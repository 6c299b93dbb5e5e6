"""The repository tree is also the import tree: beekeeper/<sub> links to the folder the package maps it to.

Path-based tools (mypy in `make lint`, pyright, editors) resolve `beekeeper.operator` through these
symlinks; setuptools packages from `[tool.setuptools.package-dir]`. The two must name the same folders.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from beekeeper.devenv import images

ROOT = Path(__file__).resolve().parents[2]


def test_symlinks_match_package_dir() -> None:
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mapped = {name.removeprefix("beekeeper."): folder for name, folder in package_dir.items() if name != "beekeeper"}
    links = {p.name: os.readlink(p) for p in (ROOT / "beekeeper").iterdir() if p.is_symlink()}
    assert links == {sub: f"../{folder}" for sub, folder in mapped.items()}
    assert all((ROOT / "beekeeper" / sub).resolve() == ROOT / folder for sub, folder in mapped.items())


def test_image_context_copies_each_file_once() -> None:
    """The image build context skips the symlinks: the Dockerfile copies the folders themselves."""
    files = [str(p) for p in images.context_files()]
    linked = tuple(f"beekeeper/{p.name}/" for p in (ROOT / "beekeeper").iterdir() if p.is_symlink())
    assert len(linked) == 4
    assert len(files) == len(set(files))
    assert [f for f in files if f.startswith(linked)] == []
    assert "operator/main.py" in files and "beekeeper/py.typed" in files


def test_node_daemon_never_imports_bcc() -> None:
    """libbcc (LLVM inside) costs a process tens of MiB of RSS, so only compile workers import bcc:
    the daemon's entry point and every module it imports later (kernel backend, datapaths) leave it out."""
    tree = ast.parse((ROOT / "node_daemon" / "main.py").read_text())
    modules = {"beekeeper.node_daemon.main"} | {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("beekeeper.")
    }
    assert "beekeeper.node_daemon.kernel_backend" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bcc'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout
