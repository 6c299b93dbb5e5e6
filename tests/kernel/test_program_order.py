"""Several programs of different BpfPrograms on one interface: tcx chains ordered by priority,
and XDP, where this kernel decides whether libxdp's multi-program dispatcher can run."""

from __future__ import annotations

import ctypes as ct
import errno
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import XDP_COUNT_UDP, tcx_chain

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import xdp_dispatcher
from beekeeper.node_daemon.backend import AttachSpec, Phase, ProgramUnit, Reason
from beekeeper.node_daemon.kernel_backend import KernelBackend

pytestmark = pytest.mark.kernel

PORT = 40021

# The earlier program marks the probe's packets; the later one counts how many it saw
# marked, so the count proves the order of two units that share no map.
TC_MARK_OR_COUNT = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(seen, u64, 2); /* [0] unmarked, [1] marked by an earlier program */

int mark_or_count(struct __sk_buff *skb) {
    u8 proto = 0;
    u16 dport = 0;
    if (skb->protocol != bpf_htons(ETH_P_IP)
        || bpf_skb_load_bytes(skb, ETH_HLEN + 9, &proto, 1) < 0 || proto != IPPROTO_UDP
        || bpf_skb_load_bytes(skb, ETH_HLEN + 20 + 2, &dport, 2) < 0 || dport != bpf_htons(PORT))
        return TC_ACT_UNSPEC;
    int slot = skb->mark == 0xbee ? 1 : 0;
    u64 *n = seen.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
    skb->mark = 0xbee;
    return TC_ACT_UNSPEC;
}
"""


@contextmanager
def daemon(bpffs_dir: Path, state: Path) -> Iterator[KernelBackend]:
    """One node daemon's backend; leaving the block is its process ending (pins stay)."""
    backend = KernelBackend(str(bpffs_dir), str(state))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def state(tmp_path: Path, bpffs_dir: Path) -> Iterator[Path]:
    """The daemons' state directory; whatever the test left attached is removed afterwards."""
    path = tmp_path / "state"
    yield path
    with daemon(bpffs_dir, path) as backend:
        for key in backend.adopted():
            backend.remove(key)


def tc_unit(key: str, interface: str, priority: int) -> ProgramUnit:
    spec = AttachSpec("mark_or_count", "tc", interfaces=[interface], direction="ingress", priority=priority)
    return ProgramUnit(key, TC_MARK_OR_COUNT, cflags=[f"-DPORT={PORT}"], programs=[spec])


def seen(backend: KernelBackend, key: str) -> tuple[int, int]:
    entries = sorted(backend.read_map(key, "seen"), key=lambda e: e.key)
    return entries[0].values[0], entries[1].values[0]


def chain_of(backend: KernelBackend, ifindex: int, *keys: str) -> list[str]:
    """The units on the tcx ingress chain, in run order (by their program ids)."""
    owner = {s.program_id: key for key in keys for s in backend.program_stats(key)}
    return [owner.get(pid, f"foreign:{pid}") for pid in tcx_chain(ifindex, bpf.ATTACH_TCX_INGRESS)]


def test_tc_priority_orders_programs_of_different_bpfprograms(bpffs_dir, state, veth):
    ifindex = socket.if_nametoindex(veth.host_if)
    with daemon(bpffs_dir, state) as backend:
        (late,) = backend.apply(tc_unit("late", veth.host_if, 20))
        (early,) = backend.apply(tc_unit("early", veth.host_if, 10))
        assert late.phase == early.phase == Phase.ATTACHED, (late, early)
        assert chain_of(backend, ifindex, "late", "early") == ["early", "late"], "attached later, runs first"
        veth.send_udp(PORT, 20)
        assert seen(backend, "early") == (20, 0)
        assert seen(backend, "late") == (0, 20), "every packet must reach the later program marked"

    with daemon(bpffs_dir, state) as backend:  # a restarted daemon places new units among adopted ones
        assert chain_of(backend, ifindex, "late", "early") == ["early", "late"]
        (middle,) = backend.apply(tc_unit("middle", veth.host_if, 15))
        (last,) = backend.apply(tc_unit("last", veth.host_if, 30))
        assert middle.phase == last.phase == Phase.ATTACHED
        units = ("late", "early", "middle", "last")
        assert chain_of(backend, ifindex, *units) == ["early", "middle", "late", "last"]

        backend.remove("middle")
        assert chain_of(backend, ifindex, "late", "early", "last") == ["early", "late", "last"]
        (moved,) = backend.apply(tc_unit("late", veth.host_if, 5))  # reorder: late now runs first
        assert moved.phase == Phase.ATTACHED, moved
        assert chain_of(backend, ifindex, "late", "early", "last") == ["late", "early", "last"]


# --- XDP ------------------------------------------------------------------------------------


def ext_load_errno() -> int:
    """The kernel's answer to a BPF_PROG_TYPE_EXT load without a target (EINVAL where
    extensions are allowed, EPERM where they are refused), asked without beekeeper's code."""
    insns = ct.create_string_buffer(struct.pack("<BBhiBBhi", 0xB7, 0, 0, 2, 0x95, 0, 0, 0), 16)
    license_ = ct.create_string_buffer(b"GPL")
    attr = ct.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, 28, 2, ct.addressof(insns), ct.addressof(license_))
    libc = ct.CDLL(None, use_errno=True)
    libc.syscall.restype = ct.c_long
    fd = libc.syscall(321, 5, attr, 128)  # bpf(BPF_PROG_LOAD)
    if fd >= 0:
        os.close(fd)
        return 0
    return ct.get_errno()


def test_multi_program_xdp_capability_is_the_kernels_answer(backend):
    multi = backend.capabilities().xdp_multi_program
    assert not multi.supported, "beekeeper cannot fill dispatcher slots with bcc-built programs"
    if ext_load_errno() == errno.EPERM:
        assert multi.reason == (
            "the kernel refuses freplace extension programs: BPF_PROG_LOAD of a BPF_PROG_TYPE_EXT (freplace) "
            "program: Operation not permitted (before the verifier ran)"
        )
    else:
        assert "the kernel takes freplace extension programs" in multi.reason


def xdp_unit(key: str, interface: str, priority: int | None = None) -> ProgramUnit:
    spec = AttachSpec("count_udp", "xdp", interfaces=[interface], xdp_mode="generic", priority=priority or 0)
    return ProgramUnit(key, XDP_COUNT_UDP, cflags=[f"-DPORT={PORT}"], programs=[spec])


def packets(backend: KernelBackend, key: str) -> int:
    (entry,) = backend.read_map(key, "packets")
    return entry.values[0]


def test_second_xdp_bpfprogram_on_an_interface_without_multi_program_xdp(bpffs_dir, state, veth):
    with daemon(bpffs_dir, state) as backend:
        if backend.capabilities().xdp_multi_program.supported:
            pytest.skip("this node runs several XDP programs per interface")
        (first,) = backend.apply(xdp_unit("first", veth.host_if, 50))
        assert first.phase == Phase.ATTACHED, first
        with veth.udp_stream(PORT) as sent:
            time.sleep(0.2)
            (second,) = backend.apply(xdp_unit("second", veth.host_if, 10))
            time.sleep(0.2)
        assert (second.phase, second.reason) == (Phase.FAILED, Reason.UNSUPPORTED_ON_NODE)
        assert second.message.startswith(
            f"xdp/generic:{veth.host_if}: BpfProgram first already runs XDP program count_udp "
            f"(id {first.program_ids[0]}) there; a second XDP program on one interface needs libxdp's "
            "multi-program dispatcher, which this node cannot run: "
        ), second.message
        assert second.message.endswith(backend.capabilities().xdp_multi_program.reason)
        assert packets(backend, "first") == sent(), "the first program must keep every packet"
        assert packets(backend, "second") == 0

    with daemon(bpffs_dir, state) as backend:  # after a restart the holder is still named
        (again,) = backend.apply(xdp_unit("second", veth.host_if, 10))
        assert "BpfProgram first already runs" in again.message
        backend.remove("first")
        (second,) = backend.apply(xdp_unit("second", veth.host_if, 10))
        assert second.phase == Phase.ATTACHED, "once the interface is free the next program attaches directly"
        veth.send_udp(PORT, 5)
        assert packets(backend, "second") == 5


def test_a_libxdp_dispatcher_on_the_interface_is_recognised_not_replaced(bpffs_dir, state, veth, cleanup):
    """What another libxdp user leaves: a dispatcher on the interface, pinned in libxdp's layout."""
    ifindex = socket.if_nametoindex(veth.host_if)
    image = xdp_dispatcher.dispatcher_object(state.parent / "cache").read_bytes()
    components = [xdp_dispatcher.Component("fw", 10), xdp_dispatcher.Component("lb", 60)]
    config = xdp_dispatcher.config_for(components)
    with xdp_dispatcher.load_dispatcher(image, config) as disp:
        link = bpf.link_create(disp.fd, ifindex, bpf.ATTACH_XDP, bpf.XDP_FLAGS_SKB_MODE)
        dispatcher_id = bpf.prog_info(disp.fd).id
    cleanup.append(link.close)
    root = Path(f"{bpffs_dir}-libxdp")  # another program's bpffs root, not under beekeeper's pins
    pins = xdp_dispatcher.pin_dir(str(root), ifindex, dispatcher_id)
    pins.mkdir(parents=True)
    cleanup.append(lambda: shutil.rmtree(root))
    with bpf.load_trivial_prog(bpf.PROG_TYPE_XDP) as component:  # stands in for a component's pin
        bpf.obj_pin(component.fd, str(pins / "prog0-prog"))

    occupant = xdp_dispatcher.inspect(ifindex, str(root))
    assert occupant is not None and occupant.config == config, "the config must read back as loaded"
    assert (occupant.prog_id, occupant.name, occupant.components) == (dispatcher_id, "xdp_dispatcher", ["prog0-prog"])
    # Its stubs are not replaced (no extension here): each returns DISPATCHER_RETVAL, every
    # slot continues on it, so the packets pass.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((veth.host_ip, PORT))
        server.settimeout(2)
        veth.send_udp(PORT, 1)
        assert server.recv(64) == b"beekeeper"

    with daemon(bpffs_dir, state) as backend:
        (report,) = backend.apply(xdp_unit("joiner", veth.host_if))
        assert (report.phase, report.reason) == (Phase.FAILED, Reason.UNSUPPORTED_ON_NODE)
        assert f"a libxdp dispatcher (id {dispatcher_id}, " in report.message
        assert bpf.xdp_attached_prog_id(ifindex) == dispatcher_id, "beekeeper must not replace it"


def test_an_older_dispatcher_version_is_refused_with_the_reason(tmp_path, veth, cleanup):
    ifindex = socket.if_nametoindex(veth.host_if)
    image = xdp_dispatcher.dispatcher_object(tmp_path / "cache").read_bytes()
    old = xdp_dispatcher.DispatcherConfig(num_progs_enabled=1, version=2)
    with xdp_dispatcher.load_dispatcher(image, old) as disp:
        link = bpf.link_create(disp.fd, ifindex, bpf.ATTACH_XDP, bpf.XDP_FLAGS_SKB_MODE)
    cleanup.append(link.close)
    occupant = xdp_dispatcher.inspect(ifindex, str(tmp_path))
    assert occupant is not None and occupant.config is None
    assert occupant.incompatible.startswith("it is a libxdp dispatcher of version 2, older than the version 3")


def xdp_verdict(prog_fd: int) -> int:
    """The action an XDP program returns for one packet (BPF_PROG_TEST_RUN)."""
    packet = ct.create_string_buffer(bytes(64), 64)
    attr = ct.create_string_buffer(48)
    struct.pack_into("<IIIIQQI", attr, 0, prog_fd, 0, 64, 0, ct.addressof(packet), 0, 1)
    libc = ct.CDLL(None, use_errno=True)
    libc.syscall.restype = ct.c_long
    assert libc.syscall(321, 10, attr, 48) == 0, os.strerror(ct.get_errno())
    return struct.unpack_from("<I", attr, 4)[0]


@pytest.mark.parametrize(
    ("enabled", "masks", "verdict"),
    [
        (0, (), xdp_dispatcher.XDP_PASS),  # no slot: pass
        (3, (xdp_dispatcher.chain_mask([xdp_dispatcher.XDP_PASS]),) * 3, xdp_dispatcher.XDP_PASS),
        # A slot that does not continue on the empty stub's return value ends the chain with it:
        # proof that the verdict follows chain_call_actions slot by slot.
        (2, (xdp_dispatcher.chain_mask([]), 1 << xdp_dispatcher.XDP_PASS), xdp_dispatcher.RETVAL),
    ],
)
def test_the_dispatcher_follows_its_config(tmp_path, enabled: int, masks: tuple[int, ...], verdict: int) -> None:
    image = xdp_dispatcher.dispatcher_object(tmp_path / "cache").read_bytes()
    padded = masks + (0,) * (xdp_dispatcher.SLOTS - len(masks))
    config = xdp_dispatcher.DispatcherConfig(num_progs_enabled=enabled, chain_call_actions=padded)
    with xdp_dispatcher.load_dispatcher(image, config) as disp:
        assert xdp_verdict(disp.fd) == verdict
