"""The chart's Argo CD health scripts on their health_test.yaml cases, in a real Lua 5.1 interpreter.

The cases' inputs were captured from live objects (tests/integration/test_status_clients.py
writes them with BEEKEEPER_CAPTURE_HEALTH_TESTDATA=1 and runs the scripts on the live
objects too); Argo CD's own test harness reads the same health_test.yaml layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from status_clients import CUSTOMIZATIONS, KINDS, health, health_tests, lua_literal

CASES = [(kind, path, expected) for kind in KINDS for path, expected in health_tests(kind)]


@pytest.mark.parametrize(("kind", "path", "expected"), CASES, ids=lambda v: getattr(v, "stem", None))
def test_health_script_matches_health_test_yaml(kind: str, path: Path, expected: dict[str, str]) -> None:
    obj = yaml.safe_load(path.read_text())
    assert obj["kind"] == kind
    assert health(kind, obj) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_every_required_case_is_covered(kind: str) -> None:
    stems = {path.stem for path, _ in health_tests(kind)}
    assert {"healthy", "progressing", "degraded", "no-status", "not-observed"} <= stems
    assert {p.stem for p in (CUSTOMIZATIONS / kind / "testdata").iterdir()} == stems, "a testdata file without a case"


def test_deleting_objects_are_progressing() -> None:
    obj = yaml.safe_load((CUSTOMIZATIONS / "BpfProgram" / "testdata" / "healthy.yaml").read_text())
    obj["metadata"]["deletionTimestamp"] = "2026-12-02T08:00:00Z"
    assert health("BpfProgram", obj)["status"] == "Progressing"


def test_lua_literal_escapes_what_json_can_hold() -> None:
    assert (
        lua_literal({"a": [1, True, None], "b": 'q"\\\n\x01'}) == '{["a"] = {1, true, nil}, ["b"] = "q\\"\\\\\\n\\001"}'
    )
