"""The chart's node-daemon capability set is exactly what the kernel asks for.

capability_probe.py runs the daemon's kernel paths (load, attach and pin every hook type,
re-adopt the pins in a new backend, the policy datapath, runtime security on a simulated
container, remove) in a process whose capabilities
are cut down with setpriv, as the container runtime does for the DaemonSet. With the chart's set
everything works; without any one of its capabilities something fails, so none is there for
nothing; and CAP_SYS_ADMIN is not among them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.kernel

VALUES = Path(__file__).resolve().parents[2] / "helm" / "beekeeper" / "values.yaml"
PROBE = Path(__file__).with_name("capability_probe.py")
CHART_CAPABILITIES: list[str] = yaml.safe_load(VALUES.read_text())["nodeDaemon"]["capabilities"]


def probe(
    capabilities: list[str], bpffs: Path, state: Path, interface: str, cgroup: Path, container: tuple[str, str]
) -> dict[str, str]:
    """Run the probe as root with only `capabilities` (bounding, permitted and effective sets)."""
    shutil.rmtree(bpffs, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
    argv = ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--"]
    argv += [sys.executable, str(PROBE), str(bpffs), str(state), interface, str(cgroup), *container]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    shutil.rmtree(bpffs, ignore_errors=True)  # whatever a failed run left pinned
    if proc.returncode != 0:
        return {"process": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def container(cgroup: Path, cleanup: list) -> tuple[str, str]:
    """A simulated container: kubepods/besteffort/pod<uid>/<id> below the test's cgroup, with a
    process of its own (root with every capability, so more than the daemon's: reading its
    /proc/PID/root and ns/mnt is a ptrace-mode access check)."""
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    path = cgroup / "kubepods" / "besteffort" / f"pod{uid}" / cid
    path.mkdir(parents=True)
    cleanup.append(lambda: [p.rmdir() for p in (path, *list(path.parents)[:3])])
    procs = path / "cgroup.procs"
    sleeper = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: procs.write_text(str(os.getpid())))
    cleanup.append(lambda: (sleeper.kill(), sleeper.wait()))
    return uid, cid


@pytest.fixture
def run(bpffs_dir: Path, tmp_path: Path, veth, cgroup: Path, container: tuple[str, str]):
    return lambda caps: probe(caps, bpffs_dir, tmp_path / "state", veth.host_if, cgroup, container)


def test_the_chart_set_is_enough(run) -> None:
    assert "SYS_ADMIN" not in CHART_CAPABILITIES
    steps = run(CHART_CAPABILITIES)
    assert steps and all(result == "ok" for result in steps.values()), steps


@pytest.mark.parametrize("missing", CHART_CAPABILITIES)
def test_every_capability_of_the_chart_is_needed(run, missing: str) -> None:
    steps = run([c for c in CHART_CAPABILITIES if c != missing])
    failed = {step: result for step, result in steps.items() if result != "ok"}
    assert failed, f"everything works without CAP_{missing}: drop it from nodeDaemon.capabilities"
    refused = ("not permitted", "unsupported", "permission denied")
    assert any(word in r.lower() for r in failed.values() for word in refused), failed
