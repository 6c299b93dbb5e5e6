"""Build the local control plane (kube-apiserver, kubectl, etcd) and node binaries from the Go module proxy.

There is no Docker engine and no prebuilt binary download on the machines we target,
so the control plane is compiled from pinned module versions and cached per version:
the first run takes minutes, every later run finds the binaries and starts in seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from beekeeper.devenv.images import Progress
from beekeeper.devenv.paths import cache_dir

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
PROMETHEUS_MODULE_VERSION = "v0.316.0"
"""github.com/prometheus/prometheus's Go module version (Prometheus 3.x is tagged v0.3xx.y); for promtool."""
PROMLINT_SOURCE = Path(__file__).with_name("promlint")
"""main.go and go.mod (client_golang pinned there) of the exposition checker the tests run."""
KSTATUS_SOURCE = Path(__file__).with_name("kstatus")
"""A small command over sigs.k8s.io/cli-utils' kstatus (pinned with its go.sum there): Flux's and kpt's health."""

# The controller manager runs only the namespace and garbage-collector controllers, so
# namespaces really go away and ownerReferences are honoured as on a real cluster.
_KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kubectl")
# What a real node and a schedulable control plane add (the real-node rig); built apart so
# the control plane alone stays a shorter cold build.
_NODE_COMMANDS = ("kubelet", "kube-scheduler", "kube-proxy")

_ETCD_MAIN = """\
// Command etcd is etcd's own server entry point, wrapped so it builds from the module proxy.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


class BuildError(RuntimeError):
    """A control-plane build step failed; the message says which and what to check."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control-plane binaries."""

    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    etcd: Path


@dataclass(frozen=True)
class NodeBinaries:
    """Paths of the built binaries of a real node (and the scheduler that places pods on it)."""

    kubelet: Path
    kube_scheduler: Path
    kube_proxy: Path


@contextmanager
def _building(out: Path, progress: Progress) -> Iterator[None]:
    """Hold the build lock of one cached output: two checkouts on a machine share the cache,
    and without it both compile the same binaries at once into the same temporary directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"[build] waiting for another build of {out.name} on this machine")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def binaries() -> Binaries:
    """Where the pinned binaries live (whether or not they are built yet)."""
    k8s = cache_dir() / "bin" / f"kubernetes-{KUBERNETES_VERSION}"
    etcd = cache_dir() / "bin" / f"etcd-{ETCD_VERSION}"
    return Binaries(k8s / "kube-apiserver", k8s / "kube-controller-manager", k8s / "kubectl", etcd / "etcd")


def ensure_built(progress: Progress = print) -> Binaries:
    """Build whatever pinned binary is missing; idempotent and cheap when cached."""
    bins = binaries()
    wanted = (bins.kube_apiserver, bins.kube_controller_manager, bins.kubectl)
    if not all(p.exists() for p in wanted):
        with _building(bins.kube_apiserver.parent, progress):
            if not all(p.exists() for p in wanted):
                _build_kubernetes(bins.kube_apiserver.parent, progress)
    if not bins.etcd.exists():
        with _building(bins.etcd.parent, progress):
            if not bins.etcd.exists():
                _build_etcd(bins.etcd.parent, progress)
    return bins


def promtool() -> Path:
    """Where the pinned promtool lives (whether or not it is built yet)."""
    return cache_dir() / "bin" / f"promtool-{PROMETHEUS_MODULE_VERSION}" / "promtool"


def ensure_promtool(progress: Progress = print) -> Path:
    """Build promtool (the Prometheus project's own exposition-format checker) once; cached like the control plane."""
    path = promtool()
    if path.exists():
        return path
    with _building(path.parent, progress):
        if path.exists():
            return path
        tmp = path.parent.with_name(path.parent.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        src = cache_dir() / "src"
        src.mkdir(parents=True, exist_ok=True)
        _go(
            [
                "install",
                "-trimpath",
                "-ldflags",
                "-s -w",
                f"github.com/prometheus/prometheus/cmd/promtool@{PROMETHEUS_MODULE_VERSION}",
            ],
            src,
            progress,
            f"build promtool {PROMETHEUS_MODULE_VERSION}",
            {"GOBIN": str(tmp)},
        )
        shutil.rmtree(path.parent, ignore_errors=True)
        tmp.rename(path.parent)
    return path


def promlint() -> Path:
    """Where the promlint checker for this source lives (whether or not it is built yet)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(PROMLINT_SOURCE.iterdir()))).hexdigest()[:12]
    return cache_dir() / "bin" / f"promlint-{digest}" / "promlint"


def ensure_promlint(progress: Progress = print) -> Path:
    """Build the small checker on client_golang's promlint, the linter `promtool check metrics` runs.

    Seconds to build where promtool takes minutes (it compiles all of Prometheus), so the
    install builds it and the tests always run it on both components' /metrics.
    """
    path = promlint()
    if not path.exists():
        src = cache_dir() / "src" / path.parent.name
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(PROMLINT_SOURCE, src)
        tmp = path.parent.with_name(path.parent.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        _go(
            ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(tmp / "promlint"), "."],
            src,
            progress,
            "build promlint",
        )
        shutil.rmtree(path.parent, ignore_errors=True)
        tmp.rename(path.parent)
    return path


def kstatus() -> Path:
    """Where the kstatus command for the current source lives (whether or not it is built yet)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(KSTATUS_SOURCE.iterdir()))).hexdigest()[:16]
    return cache_dir() / "bin" / f"kstatus-{digest}" / "kstatus"


def ensure_kstatus(progress: Progress = print) -> Path:
    """Build the kstatus command once per source version (modules from the proxy, verified by its go.sum)."""
    path = kstatus()
    if not path.exists():
        tmp = path.parent.with_name(path.parent.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        _go(
            ["build", "-C", str(KSTATUS_SOURCE), "-trimpath", "-ldflags", "-s -w", "-o", str(tmp / "kstatus"), "."],
            KSTATUS_SOURCE,
            progress,
            "build kstatus (sigs.k8s.io/cli-utils)",
            {"GOFLAGS": "-mod=readonly"},
        )
        shutil.rmtree(path.parent, ignore_errors=True)
        tmp.rename(path.parent)
    return path


def node_binaries() -> NodeBinaries:
    """Where the pinned node binaries live (whether or not they are built yet)."""
    node = cache_dir() / "bin" / f"kubernetes-node-{KUBERNETES_VERSION}"
    return NodeBinaries(node / "kubelet", node / "kube-scheduler", node / "kube-proxy")


def ensure_node_built(progress: Progress = print) -> NodeBinaries:
    """Build kubelet, kube-scheduler and kube-proxy if missing (cold: minutes, the kubelet most)."""
    bins = node_binaries()
    wanted = (bins.kubelet, bins.kube_scheduler, bins.kube_proxy)
    if not all(p.exists() for p in wanted):
        with _building(bins.kubelet.parent, progress):
            if not all(p.exists() for p in wanted):
                _build_kubernetes(bins.kubelet.parent, progress, _NODE_COMMANDS)
    return bins


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The k8s.io staging modules the release replaces with its own tree.

    Outside the kubernetes repo those replaces do not apply, so each staging module has
    to be pinned to its published v0.Y.Z twin instead.
    """
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/", kubernetes_go_mod, re.M)))


def staging_version(kubernetes_version: str) -> str:
    """v1.34.4 -> v0.34.4: the staging modules' tag for a Kubernetes release."""
    major, minor, patch = kubernetes_version.lstrip("v").split(".")
    assert major == "1", kubernetes_version
    return f"v0.{minor}.{patch}"


def kubernetes_ldflags(version: str) -> str:
    """Version stamps so /version and `kubectl version` report the real release."""
    _, minor, _ = version.lstrip("v").split(".")
    stamps = {
        "gitVersion": version,
        "gitMajor": "1",
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X '{pkg}.{key}={value}'" for key, value in stamps.items()]
    return " ".join(flags)


def _go(args: list[str], cwd: Path, progress: Progress, what: str, env: dict[str, str] | None = None) -> str:
    if shutil.which("go") is None:
        raise BuildError("`go` is not on PATH: install Go >= 1.24 (the control plane is built from source)")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", **(env or {})}
    progress(f"[build] {what}: go {' '.join(args)}")
    started = time.monotonic()
    proc = subprocess.Popen(
        ["go", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-39:], line.rstrip()]
        if line.startswith("go: downloading"):
            progress(f"[build]   {line.strip()}")
    if proc.wait() != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}); last output:\n" + "\n".join(tail))
    progress(f"[build] {what}: done in {time.monotonic() - started:.0f}s")
    return "\n".join(tail)


def go_install(package: str, version: str, ldflags: str, target: Path, progress: Progress) -> None:
    """`go install pkg@version` into a temporary directory, then move it in place (never a half-built binary);
    under the build lock, so checkouts sharing the cache build it once."""
    with _building(target.parent, progress):
        if target.exists():
            return
        tmp = target.parent.with_name(target.parent.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _go(
            ["install", "-trimpath", "-ldflags", ldflags, f"{package}@{version}"],
            tmp,
            progress,
            f"build {target.name} {version}",
            env={"GOBIN": str(tmp)},
        )
        shutil.rmtree(target.parent, ignore_errors=True)
        tmp.rename(target.parent)


def _build_kubernetes(out: Path, progress: Progress, commands: tuple[str, ...] = _KUBERNETES_COMMANDS) -> None:
    # One module directory per output: concurrent builds never rewrite each other's go.mod.
    src = cache_dir() / "src" / out.name
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text("module beekeeper.dev/controlplane\n\ngo 1.24.0\n")
    _go(["mod", "download", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], src, progress, "fetch kubernetes go.mod")
    gomod_path = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    gomod_file = re.search(r'"GoMod":\s*"([^"]+)"', gomod_path)
    if gomod_file is None:
        raise BuildError(f"cannot locate go.mod of k8s.io/kubernetes@{KUBERNETES_VERSION}")
    staging = staging_modules(Path(gomod_file.group(1)).read_text())
    twin = staging_version(KUBERNETES_VERSION)
    lines = [
        "module beekeeper.dev/controlplane",
        "",
        "go 1.24.0",
        "",
        "godebug default=go1.24",
        "",
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}",
        "",
        "replace (",
        *[f"\t{mod} => {mod} {twin}" for mod in staging],
        ")",
        "",
    ]
    (src / "go.mod").write_text("\n".join(lines))
    progress(f"[build] kubernetes {KUBERNETES_VERSION}: pinned {len(staging)} staging modules at {twin}")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    ldflags = kubernetes_ldflags(KUBERNETES_VERSION)
    for cmd in commands:
        _go(
            ["build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp / cmd), f"k8s.io/kubernetes/cmd/{cmd}"],
            src,
            progress,
            f"build {cmd} {KUBERNETES_VERSION}",
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _build_etcd(out: Path, progress: Progress) -> None:
    src = cache_dir() / "src" / f"etcd-{ETCD_VERSION}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        f"module beekeeper.dev/etcd\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
    )
    (src / "main.go").write_text(_ETCD_MAIN)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    _go(
        [
            "build",
            "-trimpath",
            "-ldflags",
            f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA={ETCD_VERSION}",
            "-o",
            str(tmp / "etcd"),
            ".",
        ],
        src,
        progress,
        f"build etcd {ETCD_VERSION}",
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    print(ensure_built(lambda msg: print(msg, file=sys.stderr, flush=True)))
