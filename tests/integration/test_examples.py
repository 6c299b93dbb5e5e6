"""Every manifest in examples/ applies to a real apiserver (a real apply, not a dry run), and
the policy examples go Ready with the operator running (in a namespace without their pods)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from beekeeper.crds.resources import BY_KIND

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))
POLICY_FILES = sorted(EXAMPLES.glob("runtimesecuritypolicy-*.yaml"))


def contains(actual: Any, expected: Any) -> bool:
    """Whether `actual` has everything `expected` has (the apiserver may add defaults, never drop fields)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return actual == expected


def test_there_are_examples() -> None:
    assert len(FILES) >= 3
    assert POLICY_FILES, "the examples include a RuntimeSecurityPolicy"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_example_applies(cluster: Any, namespace: str, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    applied: list[tuple[str, str, bool]] = []
    try:
        for doc in docs:
            namespaced = BY_KIND[doc["kind"]].names.namespaced
            if namespaced:
                # Examples name a namespace (usually default); the test runs them in its own.
                doc["metadata"]["namespace"] = namespace
            else:
                doc["metadata"]["name"] = f"{doc['metadata']['name']}-{namespace}"
            result = cluster.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False)
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            resource = f"{BY_KIND[doc['kind']].names.plural}.beekeeper.dev"
            applied.append((resource, doc["metadata"]["name"], namespaced))

            args = ["get", resource, doc["metadata"]["name"], "-o", "json"]
            stored = json.loads(cluster.kubectl(*args, *(["-n", namespace] if namespaced else [])).stdout)
            assert contains(stored["spec"], doc["spec"]), "the apiserver pruned or changed part of the example"
            BY_KIND[doc["kind"]].model_validate(stored)
    finally:
        for resource, name, namespaced in applied:
            cluster.kubectl(
                "delete", resource, name, "--ignore-not-found", *(["-n", namespace] if namespaced else []), check=False
            )


@pytest.mark.parametrize("path", POLICY_FILES, ids=[p.name for p in POLICY_FILES])
def test_policy_example_becomes_ready(cluster: Any, operator_process: Any, namespace: str, path: Path) -> None:
    """No pod of the fresh namespace is selected: the operator judges the policy Valid and Ready at once."""
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = namespace
    resource = f"{BY_KIND[doc['kind']].names.plural}.beekeeper.dev"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    name = doc["metadata"]["name"]
    cluster.kubectl("wait", "--for=condition=Ready", resource, name, "-n", namespace, "--timeout=60s")
    status = json.loads(cluster.kubectl("get", resource, name, "-n", namespace, "-o", "json").stdout)["status"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Valid"] == ("True", "Accepted") and conditions["Stalled"][0] == "False", conditions
    assert status["observedGeneration"] == 1 and status["selectedPods"] == 0, status
