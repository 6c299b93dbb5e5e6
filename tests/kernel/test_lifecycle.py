"""Updates without a gap, surviving a SIGKILLed daemon, and removal without leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
from support import XDP_COUNT_UDP

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit
from beekeeper.node_daemon.kernel_backend import KernelBackend

pytestmark = pytest.mark.kernel


TRACEPOINT_COUNTER = r"""
BPF_ARRAY(calls, u64, 1);

int count(void *ctx) {
    if (bpf_get_current_pid_tgid() >> 32 != TGID)
        return 0;
    int zero = 0;
    u64 *n = calls.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""

ALL_HOOKS = r"""
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(hits, u64, 8);
BPF_PERCPU_HASH(per_cpu, u32, u64, 16);

static __always_inline void hit(int slot) {
    u64 *n = hits.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
}
int on_xdp(struct xdp_md *ctx) { hit(0); return XDP_PASS; }
int on_tc(struct __sk_buff *skb) { hit(1); return TC_ACT_UNSPEC; }
int on_tracepoint(void *ctx) { hit(2); return 0; }
int on_raw(struct bpf_raw_tracepoint_args *ctx) { hit(3); return 0; }
int on_skb(struct __sk_buff *skb) { hit(4); return 1; }
"""


def _map_total(fd: int) -> int:
    info = bpf.map_info(fd)
    return sum(int.from_bytes(v, "little") for _, v in bpf.map_items(fd, info.key_size, info.value_size))


def _map_pin(backend: KernelBackend, name: str) -> str:
    (path,) = backend.base_dir.rglob(f"maps/{name}")
    return str(path)


def _xdp_unit(port: int, source: str, interface: str) -> ProgramUnit:
    return ProgramUnit(
        "xdp-update",
        source,
        cflags=[f"-DPORT={port}"],
        programs=[AttachSpec("count_udp", "xdp", interfaces=[interface], xdp_mode="generic")],
    )


def test_xdp_update_swaps_the_program_without_dropping_a_packet(backend, veth, kernel_objects):
    port = 40010
    (v1,) = backend.apply(_xdp_unit(port, XDP_COUNT_UDP, veth.host_if))
    assert v1.phase == Phase.ATTACHED, v1
    links_before = kernel_objects.pinned(backend.base_dir)["link"]
    v1_map = bpf.obj_get(_map_pin(backend, "packets"))  # v1's map is unpinned by the update

    with veth.udp_stream(port) as sent:
        time.sleep(0.2)
        (v2,) = backend.apply(_xdp_unit(port, XDP_COUNT_UDP + "// v2: same logic, new build\n", veth.host_if))
        time.sleep(0.2)

    assert v2.phase == Phase.ATTACHED, v2
    assert v2.program_ids != v1.program_ids, "a source change must load a new program"
    assert kernel_objects.pinned(backend.base_dir)["link"] == links_before, (
        "the link must be updated in place, not re-created"
    )
    with v1_map:
        counted_by_v1 = _map_total(v1_map.fd)
    (entry,) = backend.read_map("xdp-update", "packets")
    counted_by_v2 = entry.values[0]
    assert counted_by_v1 > 0 and counted_by_v2 > 0
    assert counted_by_v1 + counted_by_v2 == sent(), "every packet must have met v1 or v2"
    assert len(list(backend.base_dir.glob("xdp-update/*-*"))) == 1, "the old build's pins must be gone"


def test_tracepoint_update_attaches_the_new_program_before_detaching_the_old(backend):
    def unit(version: str) -> ProgramUnit:
        return ProgramUnit(
            "tp-update",
            TRACEPOINT_COUNTER + f"// {version}\n",
            cflags=[f"-DTGID={os.getpid()}"],
            programs=[AttachSpec("count", "tracepoint", tracepoint="syscalls:sys_enter_getppid")],
        )

    (v1,) = backend.apply(unit("v1"))
    assert v1.phase == Phase.ATTACHED, v1
    v1_map = bpf.obj_get(_map_pin(backend, "calls"))
    calls = 0
    stop = threading.Event()

    def syscalls() -> None:
        nonlocal calls
        while not stop.is_set():
            os.getppid()
            calls += 1

    caller = threading.Thread(target=syscalls)
    caller.start()
    try:
        time.sleep(0.1)
        (v2,) = backend.apply(unit("v2"))
        time.sleep(0.1)
    finally:
        stop.set()
        caller.join()
    assert v2.phase == Phase.ATTACHED and v2.program_ids != v1.program_ids
    with v1_map:
        counted_by_v1 = _map_total(v1_map.fd)
    (entry,) = backend.read_map("tp-update", "calls")
    # Perf-event links cannot swap programs: for a moment both run, so calls may count twice, never zero times.
    assert counted_by_v1 + entry.values[0] >= calls > 0


def test_a_failed_update_keeps_the_previous_build_attached(backend, veth):
    port = 40011
    (good,) = backend.apply(_xdp_unit(port, XDP_COUNT_UDP, veth.host_if))
    (broken,) = backend.apply(_xdp_unit(port, XDP_COUNT_UDP + "int oops(void) { return undefined; }\n", veth.host_if))
    assert (broken.phase, broken.reason) == (Phase.FAILED, "CompileError")
    assert broken.message.startswith("previous build stays attached at 1 point(s)")
    assert broken.program_ids == good.program_ids
    assert broken.attach_points == good.attach_points
    veth.send_udp(port, 10)
    (entry,) = backend.read_map("xdp-update", "packets")
    assert entry.values[0] == 10

    (rolled_back,) = backend.apply(_xdp_unit(port, XDP_COUNT_UDP, veth.host_if))
    assert rolled_back == good, "rolling back to a build still pinned reuses it as is"


ADOPTION_CHILD = """
import json, os, signal, sys
from beekeeper.node_daemon.backend import AttachSpec, ProgramUnit
from beekeeper.node_daemon.kernel_backend import KernelBackend

base, state, units = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
backend = KernelBackend(base, state)
ids = {}
for u in units:
    unit = ProgramUnit(u["key"], u["source"], u["cflags"], [AttachSpec(**p) for p in u["programs"]])
    ids[unit.key] = [list(r.program_ids) for r in backend.apply(unit)]
print(json.dumps(ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

SEND_FROM_CGROUP = """
import os, socket, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"beekeeper", ("127.0.0.1", 9))
"""


def _all_hooks_unit(veth, cgroup, version: str = "") -> ProgramUnit:
    return ProgramUnit(
        "everything",
        ALL_HOOKS + version,
        programs=[
            AttachSpec("on_xdp", "xdp", interfaces=[veth.host_if], xdp_mode="generic"),
            AttachSpec("on_tc", "tc", interfaces=[veth.host_if], direction="ingress"),
            AttachSpec("on_tracepoint", "tracepoint", tracepoint="syscalls:sys_enter_getppid"),
            AttachSpec("on_raw", "raw_tracepoint", tracepoint="sys_enter"),
            AttachSpec("on_skb", "cgroup_skb", cgroup_path=str(cgroup), direction="egress"),
        ],
    )


def test_a_new_process_adopts_pinned_programs_without_reloading(bpffs_dir, tmp_path, veth, cgroup, kernel_objects):
    kept = _all_hooks_unit(veth, cgroup)
    dropped = ProgramUnit(
        "no-longer-wanted",
        TRACEPOINT_COUNTER,
        cflags=["-DTGID=1"],
        programs=[AttachSpec("count", "tracepoint", tracepoint="syscalls:sys_enter_getppid")],
    )
    state = tmp_path / "state"
    units = json.dumps([asdict(kept), asdict(dropped)])
    child = subprocess.run(
        [sys.executable, "-c", ADOPTION_CHILD, str(bpffs_dir), str(state), units], capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    ids_in_child = json.loads(child.stdout)
    links_in_child = kernel_objects.pinned(bpffs_dir / kept.key)["link"]
    dropped_objects = kernel_objects.pinned(bpffs_dir / dropped.key)

    # Nobody runs the daemon now; every pinned link must still fire.
    veth.send_udp(40012, 5)
    os.getppid()
    subprocess.run([sys.executable, "-c", SEND_FROM_CGROUP, str(cgroup)], check=True)

    backend = KernelBackend(str(bpffs_dir), str(state))
    try:
        assert backend.adopted() == {kept.key: kept.content_hash, dropped.key: dropped.content_hash}
        hits = [e.values[0] for e in backend.read_map(kept.key, "hits")]
        assert all(hits[:5]), f"a hook stopped firing when its daemon died: {hits}"

        started = time.monotonic()
        reports = backend.sync([kept])
        assert time.monotonic() - started < 0.5, "adoption must not recompile"
        assert [r.phase for r in reports[kept.key]] == [Phase.ATTACHED] * 5
        assert [list(r.program_ids) for r in reports[kept.key]] == ids_in_child[kept.key], "reloaded, not adopted"
        assert kernel_objects.pinned(bpffs_dir / kept.key)["link"] == links_in_child
        assert backend.adopted() == {kept.key: kept.content_hash}
        assert not (bpffs_dir / dropped.key).exists()
        assert kernel_objects.still_alive(dropped_objects) == {}
    finally:
        for key in backend.adopted():
            backend.remove(key)
        backend.close()


def test_remove_frees_every_kernel_object(backend, veth, cgroup, kernel_objects):
    first = backend.apply(_all_hooks_unit(veth, cgroup, "// v1\n"))
    assert all(r.phase == Phase.ATTACHED for r in first), first
    before_update = kernel_objects.pinned(backend.base_dir)
    assert [r.phase for r in backend.apply(_all_hooks_unit(veth, cgroup, "// v2\n"))] == [Phase.ATTACHED] * 5
    objects = kernel_objects.pinned(backend.base_dir)
    assert len(objects["prog"]) == 5 and len(objects["map"]) == 2 and len(objects["link"]) == 5
    # xdp, tcx and cgroup links swap programs in place; tracepoint and raw tracepoint links are replaced
    assert len(objects["link"] & before_update["link"]) == 3
    superseded = {kind: before_update[kind] - objects[kind] for kind in objects}
    assert len(superseded["prog"]) == 5 and len(superseded["link"]) == 2
    assert kernel_objects.still_alive(superseded) == {}, "the previous build must be freed by the update"

    backend.remove("everything")
    assert kernel_objects.still_alive(objects) == {}
    assert list(backend.base_dir.iterdir()) == []
    assert backend.adopted() == {}
