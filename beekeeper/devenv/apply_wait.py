"""`beekeeper dev apply`: kubectl apply some manifests, then wait until exactly those objects are Ready.

`kubectl wait --for=condition=Ready bpfprograms --all` waits for every BpfProgram in the
cluster, and for its whole timeout when one of them is broken. This waits only for what it
applied, and stops at the first object that reports it cannot become Ready (Stalled or
Degraded True, or Valid False, for the generation applied), naming it and the reason.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from beekeeper.devenv.images import Progress

Verdict = Literal["ready", "failed", "pending"]
FAILED_WHEN = {"Stalled": "True", "Degraded": "True", "Valid": "False"}
"""Conditions that say an object is stuck, not on its way (kstatus' Stalled, BpfProgram's Degraded, NIP's Valid)."""


def verdict(obj: Mapping[str, Any]) -> tuple[Verdict, str]:
    """Where one applied object stands, and why; pure."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    what = f"{obj.get('kind', '?')}/{meta.get('name', '?')}"
    generation = meta.get("generation")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    current = {
        kind: c
        for kind, c in conditions.items()
        if c.get("observedGeneration", status.get("observedGeneration")) == generation
    }
    if status.get("observedGeneration") != generation and not current:
        return "pending", f"{what}: generation {generation} not observed yet"
    for kind, bad in FAILED_WHEN.items():
        c = current.get(kind)
        if c is not None and c.get("status") == bad:
            failing = (status.get("failingNodes") or [{}])[0]
            where = f" (node {failing['node']}, program {failing.get('program')})" if failing.get("node") else ""
            return (
                "failed",
                f"{what}: {kind}={bad} {c.get('reason')}{where}: {c.get('message') or failing.get('message')}",
            )
    ready = current.get("Ready")
    if ready is not None and ready.get("status") == "True":
        return "ready", f"{what}: {ready.get('reason')}"
    if ready is None:
        return "pending", f"{what}: no Ready condition yet"
    return "pending", f"{what}: {ready.get('reason')}: {ready.get('message')}"


def _kubectl(kubectl: Path, kubeconfig: Path, *args: str) -> str:
    result = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def apply_and_wait(
    kubectl: Path, kubeconfig: Path, files: Sequence[str], timeout: float, progress: Progress = print, poll: float = 1.0
) -> list[str]:
    """Apply `files`; returns the applied objects' names once all are Ready; RuntimeError on the first that fails."""
    names = []
    for path in files:
        names += _kubectl(kubectl, kubeconfig, "apply", "-f", path, "-o", "name").split()
    progress(f"[apply] {len(names)} object(s): {' '.join(names)}")
    deadline = time.monotonic() + timeout
    waiting: dict[str, str] = {}
    while True:
        items: list[dict[str, Any]] = []
        for path in files:  # exactly the objects of those files, in their namespaces
            got = json.loads(_kubectl(kubectl, kubeconfig, "get", "-f", path, "-o", "json"))
            items += got.get("items") if got.get("kind") == "List" else [got]
        waiting = {}
        for item in items:
            state, why = verdict(item)
            if state == "failed":
                raise RuntimeError(f"not Ready: {why}")
            if state == "pending":
                waiting[f"{item.get('kind')}/{item['metadata']['name']}"] = why
        if not waiting:
            progress("[apply] all Ready")
            return names
        if time.monotonic() > deadline:
            raise TimeoutError(f"not Ready after {timeout:.0f}s: " + "; ".join(waiting.values()))
        time.sleep(poll)
