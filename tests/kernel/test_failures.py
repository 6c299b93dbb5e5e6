"""Failures are reported precisely and never disturb a healthy program."""

from __future__ import annotations

import pytest

from beekeeper.node_daemon.backend import MESSAGE_LIMIT, AttachSpec, Phase, ProgramUnit, Reason

pytestmark = pytest.mark.kernel

PROGRAMS = r"""
BPF_ARRAY(packets, u64, 1);
BPF_HASH(seen, u32, u64, 16);

int count_all(struct xdp_md *ctx) {
    int zero = 0;
    u64 *n = packets.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return XDP_PASS;
}

int unchecked(struct xdp_md *ctx) {
    u32 key = 0;
    u64 *n = seen.lookup(&key);
    *n += 1;
    return XDP_PASS;
}

int traced(void *ctx) { return 0; }
"""

SYNTAX_ERROR = """\
BPF_ARRAY(packets, u64, 1);

int broken(struct xdp_md *ctx) {
    return XDP_PASS
}
"""


def test_each_failure_is_reported_while_the_healthy_program_runs(backend, veth):
    unit = ProgramUnit(
        "mixed",
        PROGRAMS,
        programs=[
            AttachSpec("count_all", "xdp", interfaces=[veth.host_if], xdp_mode="generic"),
            AttachSpec("unchecked", "xdp", interfaces=[veth.host_if], xdp_mode="generic"),
            AttachSpec("count_all", "xdp", interfaces=["bk-missing0"], xdp_mode="generic"),
            AttachSpec("traced", "tracepoint", tracepoint="syscalls:sys_enter_bk_missing"),
            AttachSpec("traced", "raw_tracepoint", tracepoint="bk_missing"),
            AttachSpec("traced", "kprobe", symbol="do_sys_openat2"),
            AttachSpec("not_in_source", "tracepoint", tracepoint="syscalls:sys_enter_openat"),
            AttachSpec("count_all", "xdp"),
        ],
    )
    healthy, verifier, iface, tracepoint, raw_tracepoint, kprobe, no_function, invalid = backend.apply(unit)

    assert healthy.phase == Phase.ATTACHED, healthy
    assert healthy.attach_points == (f"xdp/generic:{veth.host_if}",)

    assert (verifier.phase, verifier.reason) == (Phase.FAILED, Reason.VERIFIER_REJECTED)
    assert "invalid mem access 'map_value_or_null'" in verifier.message
    assert "*n += 1; @ line 16" in verifier.message, "verifier annotations must point at the user's lines"

    assert (iface.phase, iface.reason) == (Phase.FAILED, Reason.INTERFACE_NOT_FOUND)
    assert "bk-missing0" in iface.message
    assert (tracepoint.reason, raw_tracepoint.reason) == (Reason.TRACEPOINT_NOT_FOUND, Reason.TRACEPOINT_NOT_FOUND)
    assert tracepoint.phase == raw_tracepoint.phase == Phase.FAILED
    assert (kprobe.phase, kprobe.reason) == (Phase.FAILED, Reason.UNSUPPORTED_ON_NODE)
    assert "kernel built without kprobes" in kprobe.message
    assert (no_function.reason, invalid.reason) == (Reason.FUNCTION_NOT_FOUND, Reason.INVALID_SPEC)
    for report in (verifier, iface, tracepoint, raw_tracepoint, kprobe, no_function, invalid):
        assert 0 < len(report.message.encode()) <= MESSAGE_LIMIT

    veth.send_udp(40002, 20)
    (entry,) = backend.read_map("mixed", "packets")
    assert entry.values[0] >= 20  # (plus ARP and IPv6 noise: the program counts everything)

    again = backend.apply(unit)
    assert again == [healthy, verifier, iface, tracepoint, raw_tracepoint, kprobe, no_function, invalid]


def test_compile_error_names_the_line_and_spares_other_units(backend, veth):
    good = ProgramUnit("good", PROGRAMS, programs=[AttachSpec("count_all", "xdp", interfaces=[veth.host_if])])
    (good_report,) = backend.apply(good)
    assert good_report.phase == Phase.ATTACHED, good_report

    bad = ProgramUnit("bad", SYNTAX_ERROR, programs=[AttachSpec("broken", "tc", interfaces=[veth.host_if])])
    (report,) = backend.apply(bad)
    assert (report.phase, report.reason) == (Phase.FAILED, Reason.COMPILE_ERROR)
    assert "main.c:4:20: error: expected ';'" in report.message
    assert len(report.message.encode()) <= MESSAGE_LIMIT

    assert backend.apply(good) == [good_report]
    veth.send_udp(40003, 5)
    (entry,) = backend.read_map("good", "packets")
    assert entry.values[0] >= 5
