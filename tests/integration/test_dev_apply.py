"""`beekeeper dev apply` (what `make demo` runs) waits for exactly what it applied and stops at the first
object that cannot become Ready, with the reason, long before its timeout."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml
from support import node_bpfprogram

from beekeeper.devenv.apply_wait import apply_and_wait

pytestmark = pytest.mark.integration

TRACEPOINT = [{"name": "count_openat", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"}]
SOURCE = "int count_openat(void *ctx) { return 0; }\n"


def test_apply_waits_for_its_objects_and_fails_fast_on_a_stuck_one(
    cluster, operator_process, node_daemons, tmp_path: Path
) -> None:
    daemon = node_daemons(backend="fake")
    tag = uuid.uuid4().hex[:6]
    good = node_bpfprogram(f"apply-ok-{tag}", daemon.node, SOURCE, TRACEPOINT)
    broken = node_bpfprogram(f"apply-broken-{tag}", daemon.node, SOURCE, TRACEPOINT)
    broken["spec"]["source"] = {"configMapRef": {"namespace": "default", "name": f"absent-{tag}", "key": "prog.c"}}
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "p.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "both.yaml").write_text(yaml.safe_dump_all([good, broken]))
    lines: list[str] = []
    try:
        names = apply_and_wait(cluster.kubectl_path, cluster.kubeconfig, [str(tmp_path / "good")], 60, lines.append)
        assert names == [f"bpfprogram.beekeeper.dev/apply-ok-{tag}"] and lines[-1] == "[apply] all Ready"

        started = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            apply_and_wait(cluster.kubectl_path, cluster.kubeconfig, [str(tmp_path / "both.yaml")], 120, lines.append)
        elapsed = time.monotonic() - started
        print(f"\n{failed.value} (after {elapsed:.1f}s)")
        assert f"BpfProgram/apply-broken-{tag}: Stalled=True SourceError" in str(failed.value)
        assert f"absent-{tag}" in str(failed.value) and elapsed < 30
    finally:
        cluster.kubectl("delete", "-f", str(tmp_path / "both.yaml"), "--ignore-not-found", "--wait=false")
