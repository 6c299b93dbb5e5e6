"""Pods and checks shared by the real-node tests (tests/realnode/)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from support import Cluster

from beekeeper.devenv import testimages

HOST_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
"""Machine-wide values the kubelet would change if the rig did not contain them. (ip_forward,
which the ptp plugin sets, is the node namespace's own; the host's is shared with other test
rigs on this machine, so it is no evidence either way.)"""


def pod_manifest(namespace: str, name: str, args: list[str], labels: dict[str, str] | None = None) -> dict:
    """A pod of the rig's own testpod image (imported, never pulled)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": testimages.TESTPOD_IMAGE,
                    "imagePullPolicy": "Never",
                    "args": args,
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                }
            ],
        },
    }


@dataclass
class Verdicts:
    """What a probe-loop pod saw in a time window: allowed and refused connection attempts."""

    ok: int
    failed: int
    failures: list[str]


def probe_verdicts(cluster: Cluster, namespace: str, pod: str, since_ms: int, until_ms: int) -> Verdicts:
    """Parse a `testpod probe-loop` pod's log lines ("<unix ms> ok NAME" / "<unix ms> fail WHY")."""
    ok = failed = 0
    failures = []
    for line in cluster.kubectl("logs", "-n", namespace, pod).stdout.splitlines():
        stamp, verdict = line.split()[:2]
        if since_ms <= int(stamp) <= until_ms:
            if verdict == "ok":
                ok += 1
            else:
                failed += 1
                failures.append(line)
    return Verdicts(ok, failed, failures)


def now_ms() -> int:
    return int(time.time() * 1000)
