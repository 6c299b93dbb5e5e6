#!/usr/bin/env python3
"""Compile beekeeper's own eBPF C (bpf/*.c) into objects, once, at build time.

    python3 scripts/build_bpf.py [--out DIR]     # default: next to the sources, in bpf/

Each bpf/<name>.c becomes <name>.o (`clang -target bpf -O2 -g`: BPF bytecode with BTF),
which the node daemon loads through libbpf, so nodes need neither kernel headers nor a
compiler. scripts/install.sh runs this for the source checkout; setup.py runs it when pip
builds a wheel (the container image's build stage), writing into the wheel's tree.

An object is rebuilt only when it is older than its source, a header in bpf/ or this
script (which holds the flags). Standard library only: setup.py loads it by path, before
any dependency is installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parents[1] / "bpf"
CFLAGS = ("-target", "bpf", "-O2", "-g", "-Wall", "-Werror")


class BuildError(RuntimeError):
    """An object could not be built; the message says what is missing or what clang said."""


def _include_dirs(clang: str) -> list[str]:
    # The UAPI headers include <asm/types.h>, which Debian keeps in the host's multiarch
    # directory; clang does not search it for -target bpf.
    arch = subprocess.run([clang, "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    return [f"-I/usr/include/{arch}"] if arch else []


def build(source_dir: Path = SOURCE_DIR, out_dir: Path | None = None) -> list[tuple[Path, bool]]:
    """(object, rebuilt) for every bpf/*.c; raises BuildError if one cannot be built."""
    out_dir = out_dir or source_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_newest = max(p.stat().st_mtime for p in [Path(__file__), *source_dir.glob("*.h")])
    clang = shutil.which("clang")
    results = []
    for source in sorted(source_dir.glob("*.c")):
        obj = out_dir / f"{source.stem}.o"
        if obj.exists() and obj.stat().st_mtime >= max(inputs_newest, source.stat().st_mtime):
            results.append((obj, False))
            continue
        if clang is None:
            raise BuildError(
                f"clang is needed to build {obj.name} from {source} (Debian: apt-get install clang libbpf-dev)"
            )
        partial = obj.with_suffix(".o.partial")
        argv = [
            clang,
            *CFLAGS,
            *_include_dirs(clang),
            # Relative paths, from the sources' parent: the same bytes wherever it is built (the object's
            # hash is the datapath's build id: an unchanged build is adopted, not reloaded).
            "-fdebug-compilation-dir=.",
            "-c",
            str(source.relative_to(source_dir.parent)),
            "-o",
            str(partial.resolve()),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=source_dir.parent)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError(f"clang failed to build {obj.name}:\n{done.stderr.strip()}")
        partial.replace(obj)
        results.append((obj, True))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for the objects (default: bpf/)")
    args = parser.parse_args()
    try:
        for obj, rebuilt in build(out_dir=args.out):
            print(f"[bpf] {obj}: {'built' if rebuilt else 'up to date'} ({obj.stat().st_size} bytes)", file=sys.stderr)
    except BuildError as exc:
        print(f"[bpf] {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
