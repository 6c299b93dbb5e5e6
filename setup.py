"""setuptools hook: a built wheel ships bpf/*.o, compiled from bpf/*.c by scripts/build_bpf.py.

The rest of the packaging is in pyproject.toml. An editable install (scripts/install.sh)
uses the source tree, where install.sh builds the objects itself.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_SCRIPT = Path(__file__).resolve().parent / "scripts" / "build_bpf.py"


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        spec = importlib.util.spec_from_file_location("build_bpf", _SCRIPT)
        build_bpf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build_bpf)
        for obj, rebuilt in build_bpf.build(out_dir=Path(self.build_lib) / "beekeeper" / "bpf"):
            print(f"[bpf] {obj}: {'built' if rebuilt else 'up to date'}")


setup(cmdclass={"build_py": BuildPyWithBpf})
