"""bench/policy_scale.py at a tiny size, so the benchmark keeps working (its figures are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "policy_scale.py"


def test_policy_scale_bench_smoke() -> None:
    argv = [sys.executable, str(BENCH), "--pods", "60", "--nodes", "3", "--policies", "5"]
    argv += ["--changes", "1", "--churn", "2", "--rate", "10", "--timeout", "60"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert "apply->enforced p99, all changes, ms" in rows, done.stdout
    assert "largest object / etcd's 1.5 MiB" in rows, done.stdout
