"""The chart's node-daemon capability set is exactly what the kernel asks for.

capability_probe.py runs the daemon's kernel paths (load, attach and pin every hook type,
re-adopt the pins in a new backend, the policy datapath, remove) in a process whose capabilities
are cut down with setpriv, as the container runtime does for the DaemonSet. With the chart's set
everything works; without any one of its capabilities something fails, so none is there for
nothing; and CAP_SYS_ADMIN is not among them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.kernel

VALUES = Path(__file__).resolve().parents[2] / "helm" / "beekeeper" / "values.yaml"
PROBE = Path(__file__).with_name("capability_probe.py")
CHART_CAPABILITIES: list[str] = yaml.safe_load(VALUES.read_text())["nodeDaemon"]["capabilities"]


def probe(capabilities: list[str], bpffs: Path, state: Path, interface: str, cgroup: Path) -> dict[str, str]:
    """Run the probe as root with only `capabilities` (bounding, permitted and effective sets)."""
    shutil.rmtree(bpffs, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
    argv = ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--"]
    argv += [sys.executable, str(PROBE), str(bpffs), str(state), interface, str(cgroup)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    shutil.rmtree(bpffs, ignore_errors=True)  # whatever a failed run left pinned
    if proc.returncode != 0:
        return {"process": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def run(bpffs_dir: Path, tmp_path: Path, veth, cgroup: Path):
    return lambda caps: probe(caps, bpffs_dir, tmp_path / "state", veth.host_if, cgroup)


def test_the_chart_set_is_enough(run) -> None:
    assert "SYS_ADMIN" not in CHART_CAPABILITIES
    steps = run(CHART_CAPABILITIES)
    assert steps and all(result == "ok" for result in steps.values()), steps


@pytest.mark.parametrize("missing", CHART_CAPABILITIES)
def test_every_capability_of_the_chart_is_needed(run, missing: str) -> None:
    steps = run([c for c in CHART_CAPABILITIES if c != missing])
    failed = {step: result for step, result in steps.items() if result != "ok"}
    assert failed, f"everything works without CAP_{missing}: drop it from nodeDaemon.capabilities"
    assert any("not permitted" in r or "unsupported" in r.lower() for r in failed.values()), failed
