"""Prepare this machine's kernel interfaces for eBPF work, saying why each step is needed.

bpffs holds pinned programs, maps and links (they outlive the daemon); tracefs lists
tracepoints and uprobe events; bcc compiles against kernel headers found under
/lib/modules/$(uname -r)/. A distro container or VM often lacks all three.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from pathlib import Path

from beekeeper.devenv.images import Progress

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
TRACEFS = Path("/sys/kernel/tracing")


def _mounted(path: Path, fstype: str) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) and line.split()[2] == fstype for line in mounts)


def _mount(path: Path, fstype: str, why: str, progress: Progress) -> None:
    if _mounted(path, fstype):
        return
    progress(f"[host] mounting {fstype} at {path}: {why}")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", fstype, fstype, str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"cannot mount {fstype} at {path} ({result.stderr.strip()}); run as root or mount it yourself"
        )


def _headers_candidates(release: str) -> tuple[Path | None, Path | None]:
    """The distro header tree nearest to the running kernel: (arch build dir, common source dir)."""
    src = Path("/usr/src")
    if not src.is_dir():
        return None, None

    def version_key(path: Path) -> tuple[int, ...]:
        digits = [int(x) for x in path.name.replace("linux-headers-", "").replace("-", ".").split(".") if x.isdigit()]
        return tuple(digits)

    builds = sorted(
        (p for p in src.glob("linux-headers-*-amd64") if not p.name.endswith(("-cloud-amd64", "-rt-amd64"))),
        key=version_key,
    )
    exact = src / f"linux-headers-{release}"
    build = exact if exact.is_dir() else (builds[-1] if builds else None)
    if build is None:
        return None, None
    common = Path(str(build).removesuffix("-amd64") + "-common")
    return build, common if common.is_dir() else None


def link_kernel_headers(progress: Progress = print) -> None:
    """Point /lib/modules/$(uname -r)/{build,source} at the nearest installed headers."""
    release = platform.release()
    moddir = Path("/lib/modules") / release
    if (moddir / "build" / "include").exists() and (moddir / "source" / "include" / "linux" / "kconfig.h").exists():
        return
    if (moddir / "build" / "include" / "linux" / "kconfig.h").exists():
        return
    build, common = _headers_candidates(release)
    if build is None:
        raise RuntimeError(
            f"no kernel headers for {release}: bcc compiles against them; "
            "install the distro's headers (Debian: apt-get install linux-headers-amd64)"
        )
    progress(f"[host] linking kernel headers {build.name} for running kernel {release}: bcc needs them to compile")
    moddir.mkdir(parents=True, exist_ok=True)
    for name, target in (("build", build), ("source", common or build)):
        link = moddir / name
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(target)


def prepare_host(progress: Progress = print) -> None:
    """Idempotently make bpffs, tracefs and kernel headers available."""
    if os.geteuid() != 0:
        raise RuntimeError("loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON); run as root")
    _mount(BPFFS, "bpf", "pinned programs, maps and links must outlive the node daemon", progress)
    _mount(TRACEFS, "tracefs", "tracepoints and uprobes are resolved through tracefs", progress)
    link_kernel_headers(progress)
