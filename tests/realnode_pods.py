"""Pods and checks shared by the real-node tests (tests/realnode/)."""

from __future__ import annotations

from beekeeper.devenv import testimages

HOST_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward")
"""Machine-wide values a kubelet or CNI plugin would change if the rig did not contain them."""


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
