"""Builders of API objects for the pure-logic tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

SOURCE = "TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return 0; }"


def _bpfprogram(name: str, selector: dict | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "beekeeper.dev/v1alpha1",
        "kind": "BpfProgram",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "source": {"inline": SOURCE},
            "programs": [
                {
                    "name": "tracepoint__syscalls__sys_enter_openat",
                    "type": "tracepoint",
                    "tracepoint": "syscalls:sys_enter_openat",
                }
            ],
            **spec,
        },
    }
    if selector is not None:
        body["spec"]["nodeSelector"] = selector
    return body


@pytest.fixture
def bpfprogram() -> Callable[..., dict[str, Any]]:
    """bpfprogram(name, nodeSelector=None, **spec overrides) -> a valid BpfProgram body."""
    return _bpfprogram
