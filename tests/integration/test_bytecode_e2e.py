"""A BpfProgram from a CO-RE object in a ConfigMap, end to end: real apiserver, operator, node
daemon and kernel. The object is examples/core/open_counts.bpf.c, built here with clang."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from core_objects import compile_core
from kubernetes import client
from support import wait_for

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, BPF_PROGRAM_PLURAL, GROUP, VERSION

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OPENER = """
import sys
for line in sys.stdin:
    for _ in range(int(line)):
        open(sys.argv[1]).close()
    print("done", flush=True)
"""


class Opener:
    """A process that opens a file n times when asked: its pid is known before the program loads,
    and nothing else it does opens files."""

    def __init__(self, target: Path) -> None:
        target.write_text("x")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OPENER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid
        self.inode = os.stat(sys.executable).st_ino  # /proc/<pid>/exe of the child

    def open(self, times: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{times}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def opener(tmp_path: Path) -> Iterator[Opener]:
    proc = Opener(tmp_path / "opened")
    yield proc
    proc.close()


def _example(namespace: str, node: str, pid: int) -> dict[str, Any]:
    """The shipped example, pointed at this test's ConfigMap, node and process."""
    doc = yaml.safe_load((EXAMPLES / "core" / "bpfprogram-open-counts.yaml").read_text())
    name = f"core-opens-{uuid.uuid4().hex[:6]}"
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    spec["nodeSelector"] = {"matchLabels": {"kubernetes.io/hostname": node}}
    spec["bytecode"]["configMapRef"]["namespace"] = namespace
    spec["globalData"]["target_tgid"] = base64.b64encode(struct.pack("<I", pid)).decode()
    spec["metrics"][0]["name"] = f"test_{name.replace('-', '_')}_total"
    return doc


def _put_object(cluster: Any, namespace: str, obj: bytes) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "open-counts", "namespace": namespace},
        "binaryData": {"open_counts.o": base64.b64encode(obj).decode()},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


def test_core_object_from_configmap_becomes_ready_and_exports_its_map(
    cluster, operator_process, node_daemons, namespace, opener
) -> None:
    source = (EXAMPLES / "core" / "open_counts.bpf.c").read_text()
    _put_object(cluster, namespace, compile_core(source, "open_counts"))
    daemon = node_daemons()
    doc = _example(namespace, daemon.node, opener.pid)
    del doc["spec"]["globalData"]["step"]  # the object's default (STEP) until the last step of the test
    name, metric = doc["metadata"]["name"], doc["spec"]["metrics"][0]["name"]
    custom = client.CustomObjectsApi(cluster.api())
    sample = f'{metric}{{bpfprogram="{name}",inode="{opener.inode}"}}'

    def attached_hash() -> str | None:
        state = custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, daemon.node)
        reports = [p for p in (state.get("status") or {}).get("programs") or [] if p["bpfProgram"] == name]
        return reports[0]["contentHash"] if reports and reports[0]["phase"] == "Attached" else None

    def counted(expected: float) -> float:
        def read() -> float | None:
            for line in daemon.metrics().splitlines():
                if line.startswith(sample + " "):
                    got = float(line.split()[-1])
                    return got if got == expected else None
            return None

        return wait_for(read, 30, f"{sample} == {expected}")

    def rolled_out(old: str) -> str:
        return wait_for(lambda: (h := attached_hash()) and h != old and h, 120, "the change attached on the node")

    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    try:

        def ready() -> dict[str, Any] | None:
            status = custom.get_cluster_custom_object(GROUP, VERSION, BPF_PROGRAM_PLURAL, name).get("status") or {}
            return status if status.get("ready") == "1/1" and status.get("phase") == "Ready" else None

        wait_for(ready, 120, f"BpfProgram {name} Ready")
        first = attached_hash()
        assert first is not None
        opener.open(50)
        assert counted(50) == 50, "only the process globalData names is counted, once per open"

        # A new object in the ConfigMap rolls out like a spec change (a new build, its own map).
        _put_object(cluster, namespace, compile_core(source, "open_counts_step3", ["-DSTEP=3"]))
        second = rolled_out(first)
        opener.open(10)
        assert counted(30) == 30

        # globalData overrides the object's default.
        doc["spec"]["globalData"]["step"] = base64.b64encode(struct.pack("<Q", 5)).decode()
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        rolled_out(second)
        opener.open(10)
        assert counted(50) == 50
        wait_for(ready, 60, f"BpfProgram {name} Ready again")  # the operator aggregates the node's report after it
    finally:
        cluster.kubectl("delete", "bpfprogram", name, "--ignore-not-found", "--timeout=90s", check=False)
