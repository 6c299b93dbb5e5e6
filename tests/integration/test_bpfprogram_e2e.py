"""BpfProgram end to end: real apiserver, operator and node daemon processes, real kernel."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from support import Api, VethNamespace, check_exposition, tcx_chain, wait_for

from beekeeper.crds.names import GROUP, VERSION
from beekeeper.node_daemon.bpf_syscalls import ATTACH_TCX_INGRESS

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

OPENAT_COUNTER = """
BPF_HASH(opens, u32, u64, 1024);
TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    opens.increment(pid);
    return 0;
}
"""

XDP_COUNTER = """
#include <uapi/linux/bpf.h>
BPF_ARRAY(packets, u64, 1);
int count_packets(struct xdp_md *ctx) {
    int zero = 0;
    u64 *value = packets.lookup(&zero);
    if (value)
        __sync_fetch_and_add(value, 1);
    return XDP_PASS;
}
"""


def uid() -> str:
    return uuid.uuid4().hex[:6]


def bpfprogram(name: str, source: str, programs: list[dict], selector: dict | None = None, **spec: Any) -> dict:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BpfProgram",
        "metadata": {"name": name},
        "spec": {"source": {"inline": source}, "programs": programs, **spec},
    }
    if selector:
        body["spec"]["nodeSelector"] = selector
    return body


@pytest.fixture
def api(cluster, operator_process) -> Api:
    return Api(cluster)


@pytest.fixture
def programs(api: Api):
    """Names of BpfPrograms a test created; deleted (finalizers honoured) afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        api.delete(name, wait=False)


def openat_program(name: str, selector: dict | None = None) -> dict:
    return bpfprogram(
        name,
        OPENAT_COUNTER,
        [
            {
                "name": "tracepoint__syscalls__sys_enter_openat",
                "type": "tracepoint",
                "tracepoint": "syscalls:sys_enter_openat",
            }
        ],
        selector,
        metrics=[
            {
                "map": "opens",
                "name": f"test_opens_{name.replace('-', '_')}",
                "type": "counter",
                "key": {"kind": "int", "label": "pid"},
            }
        ],
    )


def test_node_selector_places_program_on_matching_nodes(api: Api, node_daemons, programs) -> None:
    edge = [node_daemons({"role": "edge"}) for _ in range(2)]
    core = node_daemons({"role": "core"})
    name = f"opens-{uid()}"
    programs.append(name)
    api.apply(openat_program(name, {"matchLabels": {"role": "edge", **core.test_labels}}))

    status = api.ready(name, "2/2")
    assert status["nodes"] == {"selected": 2, "ready": 2, "failed": 0}
    for daemon in edge:
        (report,) = api.node_reports(daemon.node, name)
        assert report["phase"] == "Attached" and report["programIds"]
    assert api.node_reports(core.node, name) == []
    printed = api.cluster.kubectl("get", "bpfprograms", name).stdout
    assert re.search(rf"{name}\s+2/2\s+Ready", printed), printed

    # Relabel: the core node joins, one edge node leaves.
    api.cluster.kubectl("label", "node", core.node, "role=edge", "--overwrite")
    api.cluster.kubectl("label", "node", edge[1].node, "role=core", "--overwrite")
    wait_for(
        lambda: api.node_reports(core.node, name) and api.node_reports(core.node, name)[0]["phase"] == "Attached",
        60,
        "program attached on relabelled node",
    )
    wait_for(lambda: api.node_reports(edge[1].node, name) == [], 60, "program removed from the node that left")
    api.ready(name, "2/2")


def test_metrics_count_real_syscalls(api: Api, node_daemons, programs, tmp_path: Path) -> None:
    daemon = node_daemons()
    name = f"opens-{uid()}"
    programs.append(name)
    api.apply(openat_program(name, {"matchLabels": {"kubernetes.io/hostname": daemon.node}}))
    api.ready(name, "1/1")
    target = tmp_path / "f"
    target.write_text("x")
    proc = subprocess.Popen(
        ["python3", "-c", f"import time\nfor _ in range(50): open({str(target)!r}).close()\ntime.sleep(30)"]
    )
    try:
        metric = f"test_opens_{name.replace('-', '_')}"

        def count() -> float | None:
            for line in daemon.metrics().splitlines():
                if line.startswith(f'{metric}_total{{bpfprogram="{name}",pid="{proc.pid}"}}'):
                    value = float(line.split()[-1])
                    return value if value >= 50 else None
            return None

        assert wait_for(count, 30, f"{metric} for pid {proc.pid} >= 50") >= 50
        assert "beekeeper_bpf_program_runs_total" in daemon.metrics()
    finally:
        proc.kill()


def test_xdp_counter_counts_real_packets(api: Api, node_daemons, programs) -> None:
    daemon = node_daemons()
    tag = uid()
    ns = VethNamespace(f"bk-e2e-{tag}", f"bkx{tag}", "10.213.7.2", "10.213.7.1").create()
    try:
        name = f"xdp-{tag}"
        programs.append(name)
        api.apply(
            bpfprogram(
                name,
                XDP_COUNTER,
                [
                    {
                        "name": "count_packets",
                        "type": "xdp",
                        "xdpMode": "generic",
                        "interfaceSelector": {"interfaces": [ns.host_if]},
                    }
                ],
                {"matchLabels": {"kubernetes.io/hostname": daemon.node}},
                metrics=[
                    {
                        "map": "packets",
                        "name": f"test_xdp_{tag}",
                        "type": "counter",
                        "key": {"kind": "int", "label": "slot"},
                    }
                ],
            )
        )
        api.ready(name, "1/1")
        (report,) = api.node_reports(daemon.node, name)
        assert any(ns.host_if in point for point in report["attachPoints"]), report
        send = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(10): s.sendto(b'x', ({ns.host_ip!r}, 9))"
        )
        ns.run("python3", "-c", send)

        def packets() -> float | None:
            for line in daemon.metrics().splitlines():
                if line.startswith(f"test_xdp_{tag}_total{{"):
                    value = float(line.split()[-1])
                    return value if value >= 10 else None
            return None

        assert wait_for(packets, 20, "xdp packet counter >= 10") >= 10
    finally:
        ns.delete()


def test_metric_problems_are_on_status_and_never_break_another_programs_metrics(
    api: Api, node_daemons, programs, tmp_path: Path
) -> None:
    """A metric whose map does not exist, and one whose family an older BpfProgram exports: both
    reported (Degraded, MetricsNotExported, naming the map and the owner); /metrics stays parseable
    in both formats (promtool when built) and the older program's series are intact."""
    daemon = node_daemons()
    tag = uid()
    selector = {"matchLabels": {"kubernetes.io/hostname": daemon.node}}
    older, newer = f"collide-a-{tag}", f"collide-b-{tag}"  # on a creationTimestamp tie the name decides: a first
    family = f"test_collide_{tag}"
    tracepoint = [
        {
            "name": "tracepoint__syscalls__sys_enter_openat",
            "type": "tracepoint",
            "tracepoint": "syscalls:sys_enter_openat",
        }
    ]
    programs += [older, newer]
    counter = {"map": "opens", "name": f"{family}_total", "type": "counter", "key": {"kind": "int", "label": "pid"}}
    api.apply(bpfprogram(older, OPENAT_COUNTER, tracepoint, selector, metrics=[counter]))
    api.ready(older, "1/1")
    clashing = {"map": "opens", "name": family, "type": "gauge", "key": {"kind": "int", "label": "tid"}}
    missing = {"map": "nope", "name": f"test_missing_{tag}", "type": "gauge", "key": {"kind": "int", "label": "k"}}
    api.apply(bpfprogram(newer, OPENAT_COUNTER, tracepoint, selector, metrics=[clashing, missing]))

    def degraded() -> dict[str, Any] | None:
        status = api.program(newer).get("status") or {}
        return status if status.get("phase") == "Degraded" and len(status.get("warnings") or []) == 2 else None

    status = wait_for(degraded, 120, f"BpfProgram {newer} Degraded with two warnings")
    assert status["ready"] == "1/1", "the program itself runs"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Degraded"]["reason"] == "MetricsNotExported"
    clash, absent = status["warnings"]
    assert clash.startswith(f"metric {family}: not exported: family {family} is exported by BpfProgram {older}")
    assert f"metric test_missing_{tag}: not exported: unit {newer} has no map 'nope' (it has: opens)" in absent
    assert absent.endswith(f"(node {daemon.node})")
    assert re.search(rf"{newer}\s+1/1\s+Degraded", api.cluster.kubectl("get", "bpfprograms", newer).stdout)
    assert "warnings" not in api.program(older)["status"] and api.program(older)["status"]["phase"] == "Ready"

    (tmp_path / "f").write_text("x")
    subprocess.run(["python3", "-c", f"open({str(tmp_path / 'f')!r}).close()"], check=True)

    def scraped() -> dict[str, Any] | None:
        families = check_exposition(daemon.metrics())
        return families if families.get(family) else None

    samples = wait_for(scraped, 30, f"{family} on /metrics")[family]
    assert {dict(labels)["bpfprogram"] for _, labels in samples} == {older}
    assert all(name == f"{family}_total" for name, _ in samples)
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.metrics_port}/metrics",
        headers={"Authorization": f"Bearer {daemon.token}", "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert family in check_exposition(resp.read().decode(), openmetrics=True)

    api.delete(older)  # the family is free: the newer program's gauge takes it, its clash warning goes away
    wait_for(lambda: len(api.program(newer)["status"].get("warnings") or []) == 1, 60, "only the missing map left")
    samples = wait_for(scraped, 30, f"{family} of {newer}")[family]
    assert {(name, dict(labels)["bpfprogram"]) for name, labels in samples} == {(family, newer)}


BROKEN_CASES = {
    "syntax": (
        "int broken(void *ctx) {\n    return undefined_thing;\n}\n",
        {"name": "broken", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"},
        "CompileError",
        r":2:",
    ),
    "verifier": (
        "BPF_HASH(m, u32, u64);\nint bad(void *ctx) {\n    u32 k = 0;\n    u64 *v = m.lookup(&k);\n    return *v;\n}\n",
        {"name": "bad", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_openat"},
        "Verifier",
        r"invalid mem access|null|R\d",
    ),
    "interface": (
        "int x(struct xdp_md *ctx) { return 2; }\n",
        {"name": "x", "type": "xdp", "interfaceSelector": {"interfaces": ["bk-nope0"]}},
        "InterfaceNotFound",
        r"bk-nope0",
    ),
    "tracepoint": (
        "int t(void *ctx) { return 0; }\n",
        {"name": "t", "type": "tracepoint", "tracepoint": "syscalls:sys_enter_nonexistent"},
        "TracepointNotFound",
        r"sys_enter_nonexistent",
    ),
    "kprobe": (
        "int k(void *ctx) { return 0; }\n",
        {"name": "k", "type": "kprobe", "symbol": "do_sys_openat2"},
        "UnsupportedOnNode",
        r"kprobe",
    ),
}


def test_broken_programs_fail_with_reasons_while_healthy_one_stays(api: Api, node_daemons, programs) -> None:
    daemon = node_daemons()
    selector = {"matchLabels": {"kubernetes.io/hostname": daemon.node}}
    healthy = f"healthy-{uid()}"
    programs.append(healthy)
    api.apply(openat_program(healthy, selector))
    api.ready(healthy, "1/1")
    healthy_ids = api.node_reports(daemon.node, healthy)[0]["programIds"]

    broken = {}
    for case, (source, program, _, _) in BROKEN_CASES.items():
        name = f"broken-{case}-{uid()}"
        programs.append(name)
        broken[case] = name
        api.apply(bpfprogram(name, source, [program], selector))

    for case, (_, _, reason, pattern) in BROKEN_CASES.items():
        name = broken[case]

        def failed(name: str = name) -> dict | None:
            status = api.program(name).get("status") or {}
            return status if status.get("phase") == "Degraded" and status.get("failingNodes") else None

        status = wait_for(failed, 90, f"{case}: Degraded")
        failing = status["failingNodes"][0]
        assert failing["node"] == daemon.node
        assert reason in failing["reason"], (case, failing)
        assert re.search(pattern, failing["message"]), (case, failing["message"])
        assert status["ready"] == "0/1"

    (report,) = api.node_reports(daemon.node, healthy)
    assert report["phase"] == "Attached" and report["programIds"] == healthy_ids

    def warning_event() -> str:
        out = api.cluster.kubectl(
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            f"involvedObject.name={broken['syntax']}",
            "-o",
            "jsonpath={range .items[*]}{.type} {.reason}: {.message}{'\\n'}{end}",
        ).stdout
        return out if "Warning Degraded" in out else ""

    assert ":2:" in wait_for(warning_event, 30, "a Warning event for the degraded program")
    caps = api.nodestate(daemon.node)["status"]["capabilities"]
    assert caps["programTypes"]["kprobe"] is False and "kprobe" in caps["reasons"]["kprobe"].lower()


def test_delete_waits_for_nodes_to_detach(api: Api, node_daemons, programs) -> None:
    daemon = node_daemons()
    name = f"del-{uid()}"
    api.apply(openat_program(name, {"matchLabels": {"kubernetes.io/hostname": daemon.node}}))
    api.ready(name, "1/1")
    ids = api.node_reports(daemon.node, name)[0]["programIds"]
    assert "beekeeper.dev/detach" in api.program(name)["metadata"]["finalizers"]

    daemon.stop()  # this node cannot detach now
    api.delete(name, wait=False)
    time.sleep(3)
    assert api.program(name)["metadata"].get("deletionTimestamp"), "finalizer holds the object"
    assert api.program(name)["status"]["phase"] == "Deleting"
    daemon.start()
    wait_for(lambda: _gone(api, name), 60, "BpfProgram deleted after the node detached")
    loaded = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    assert all(f'"id":{i},' not in loaded.replace(" ", "") for i in ids), "kernel program unloaded"


def test_delete_completes_when_node_is_gone(api: Api, node_daemons, programs) -> None:
    daemon = node_daemons()
    name = f"gone-{uid()}"
    api.apply(openat_program(name, {"matchLabels": {"kubernetes.io/hostname": daemon.node}}))
    api.ready(name, "1/1")
    daemon.stop()
    api.delete(name, wait=False)
    api.cluster.kubectl("delete", "node", daemon.node)
    wait_for(lambda: _gone(api, name), 60, "BpfProgram deleted once its only node is gone")
    wait_for(lambda: api.nodestate(daemon.node) is None, 60, "BpfNodeState removed with its Node")


def _gone(api: Api, name: str) -> bool:
    try:
        api.program(name)
    except client.ApiException as exc:
        return exc.status == 404
    return False


def test_daemon_restart_readopts_without_reload(api: Api, node_daemons, programs) -> None:
    daemon = node_daemons()
    name = f"adopt-{uid()}"
    programs.append(name)
    api.apply(openat_program(name, {"matchLabels": {"kubernetes.io/hostname": daemon.node}}))
    api.ready(name, "1/1")
    before = api.node_reports(daemon.node, name)[0]
    daemon.kill()
    daemon.start()
    wait_for(lambda: "node daemon started" in daemon.log.read_text(), 30, "daemon restarted")
    time.sleep(2)
    after = api.node_reports(daemon.node, name)[0]
    assert after["programIds"] == before["programIds"]
    assert after["phase"] == "Attached" and after["lastTransitionTime"] == before["lastTransitionTime"]


def test_operator_restart_writes_nothing(api: Api, node_daemons, programs, operator_process) -> None:
    daemon = node_daemons()
    name = f"quiet-{uid()}"
    programs.append(name)
    api.apply(openat_program(name, {"matchLabels": {"kubernetes.io/hostname": daemon.node}}))
    api.ready(name, "1/1")
    time.sleep(1)
    state_version = api.nodestate(daemon.node)["metadata"]["resourceVersion"]
    program_version = api.program(name)["metadata"]["resourceVersion"]
    operator_process.restart()  # ready: its first pass, where any rewrite would be, completed
    assert api.nodestate(daemon.node)["metadata"]["resourceVersion"] == state_version
    assert api.program(name)["metadata"]["resourceVersion"] == program_version


def test_source_update_converges_and_reports_new_hash(api: Api, node_daemons, programs) -> None:
    daemon = node_daemons()
    name = f"upd-{uid()}"
    programs.append(name)
    manifest = openat_program(name, {"matchLabels": {"kubernetes.io/hostname": daemon.node}})
    api.apply(manifest)
    api.ready(name, "1/1")
    old = api.node_reports(daemon.node, name)[0]
    manifest["spec"]["source"]["inline"] = OPENAT_COUNTER.replace("1024", "2048")
    api.apply(manifest)
    wait_for(
        lambda: (
            api.node_reports(daemon.node, name)[0]["contentHash"] != old["contentHash"]
            and api.node_reports(daemon.node, name)[0]["phase"] == "Attached"
        ),
        60,
        "new content attached",
    )
    status = api.ready(name, "1/1")
    assert status["observedGeneration"] == api.program(name)["metadata"]["generation"]
    assert api.node_reports(daemon.node, name)[0]["programIds"] != old["programIds"]


TC_PASS_COUNTER = """
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(packets, u64, 1);
int count_tc(struct __sk_buff *skb) {
    int zero = 0;
    u64 *value = packets.lookup(&zero);
    if (value)
        __sync_fetch_and_add(value, 1);
    return TC_ACT_UNSPEC;
}
"""


def test_two_bpfprograms_on_one_interface(api: Api, node_daemons, programs) -> None:
    """tc: both Ready, chained in priority order. xdp: both Ready where the node runs
    libxdp's multi-program dispatcher; elsewhere the second says why, the first runs."""
    daemon = node_daemons()
    selector = {"matchLabels": {"kubernetes.io/hostname": daemon.node}}
    tag = uid()
    ns = VethNamespace(f"bk-e2e-{tag}", f"bko{tag}", "10.213.8.2", "10.213.8.1").create()
    try:
        tc = {name: f"tc-{prio}-{tag}" for name, prio in (("late", 20), ("early", 10))}
        for prio, key in ((20, "late"), (10, "early")):
            programs.append(tc[key])
            program = {
                "name": "count_tc",
                "type": "tc",
                "direction": "ingress",
                "priority": prio,
                "interfaceSelector": {"interfaces": [ns.host_if]},
            }
            api.apply(bpfprogram(tc[key], TC_PASS_COUNTER, [program], selector))
            api.ready(tc[key], "1/1")
        ids = {key: api.node_reports(daemon.node, name)[0]["programIds"][0] for key, name in tc.items()}
        chain = tcx_chain(socket.if_nametoindex(ns.host_if), ATTACH_TCX_INGRESS)
        assert chain == [ids["early"], ids["late"]], "the lower priority runs first, across BpfPrograms"

        xdp = [f"xdp-a-{tag}", f"xdp-b-{tag}"]
        for prio, name in zip((60, 10), xdp, strict=True):
            programs.append(name)
            program = {
                "name": "count_packets",
                "type": "xdp",
                "xdpMode": "generic",
                "priority": prio,
                "interfaceSelector": {"interfaces": [ns.host_if]},
            }
            api.apply(bpfprogram(name, XDP_COUNTER, [program], selector))
        api.ready(xdp[0], "1/1")
        caps = wait_for(lambda: (api.nodestate(daemon.node) or {}).get("status", {}).get("capabilities"), 30, "caps")
        if caps["xdpMultiProgram"]:
            api.ready(xdp[1], "1/1")
            return
        assert "freplace" in caps["xdpMultiProgramReason"], caps

        def degraded() -> dict | None:
            status = api.program(xdp[1]).get("status") or {}
            return status if status.get("phase") == "Degraded" and status.get("failingNodes") else None

        failing = wait_for(degraded, 90, f"{xdp[1]} Degraded")["failingNodes"][0]
        assert failing["reason"] == "UnsupportedOnNode", failing
        assert f"BpfProgram {xdp[0]} already runs XDP program count_packets" in failing["message"]
        assert failing["message"].endswith(caps["xdpMultiProgramReason"])
        (first,) = api.node_reports(daemon.node, xdp[0])
        assert first["phase"] == "Attached", first
    finally:
        ns.delete()
