"""The in-memory backend keeps the real backend's contract."""

from __future__ import annotations

import pytest

from beekeeper.node_daemon.backend import AttachSpec, Layout, MapNotFound, Phase, ProgramUnit, Reason, UnitNotFound
from beekeeper.node_daemon.fake_backend import FakeBackend, FakeKernel

SOURCE = """\
BPF_HASH(counts, u32, u64);
BPF_ARRAY(totals, u64, 4);
int on_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int on_open(void *ctx) { return 0; }
"""


def unit(source: str = SOURCE, *programs: AttachSpec) -> ProgramUnit:
    return ProgramUnit(
        "demo",
        source,
        programs=programs
        or (
            AttachSpec("on_xdp", "xdp", interface_pattern="veth*"),
            AttachSpec("on_open", "tracepoint", tracepoint="syscalls:sys_enter_openat"),
        ),
    )


def test_apply_is_idempotent_and_builds_once_per_content():
    kernel = FakeKernel()
    backend = FakeBackend(kernel, interfaces=["lo", "veth1", "veth0"])
    first = backend.apply(unit())
    assert [r.phase for r in first] == [Phase.ATTACHED, Phase.ATTACHED]
    assert first[0].attach_points == ("xdp/native:veth0", "xdp/native:veth1")
    assert first[1].attach_points == ("tracepoint:syscalls:sys_enter_openat",)
    assert backend.apply(unit()) == first
    assert kernel.builds == 1

    changed = backend.apply(unit(SOURCE + "// v2\n"))
    assert kernel.builds == 2
    assert changed[0].program_ids != first[0].program_ids


def test_a_restarted_backend_adopts_without_rebuilding():
    kernel = FakeKernel()
    first = FakeBackend(kernel, interfaces=["veth0"]).apply(unit())
    restarted = FakeBackend(kernel, interfaces=["veth0"])
    assert restarted.adopted() == {"demo": unit().content_hash}
    assert restarted.sync([unit()]) == {"demo": first}
    assert kernel.builds == 1
    assert restarted.sync([]) == {} and restarted.adopted() == {}


def test_failures_are_reported_per_program():
    backend = FakeBackend(interfaces=["eth0"])
    reports = backend.apply(
        unit(
            SOURCE,
            AttachSpec("on_xdp", "xdp", interfaces=["eth0"]),
            AttachSpec("on_xdp", "xdp", interfaces=["veth9"]),
            AttachSpec("on_xdp", "xdp", interface_pattern="veth*"),
            AttachSpec("missing", "tracepoint", tracepoint="a:b"),
            AttachSpec("on_open", "kprobe", symbol="do_sys_open"),
            AttachSpec("on_open", "tracepoint"),
        )
    )
    assert [(r.phase, r.reason) for r in reports] == [
        (Phase.ATTACHED, ""),
        (Phase.FAILED, Reason.INTERFACE_NOT_FOUND),
        (Phase.LOADED, Reason.NO_MATCHING_INTERFACES),
        (Phase.FAILED, Reason.FUNCTION_NOT_FOUND),
        (Phase.FAILED, Reason.UNSUPPORTED_ON_NODE),
        (Phase.FAILED, Reason.INVALID_SPEC),
    ]


def test_error_directive_is_a_compile_error_with_its_line():
    (report, _) = FakeBackend().apply(unit(SOURCE + "#error deliberately broken\n"))
    assert (report.phase, report.reason) == (Phase.FAILED, Reason.COMPILE_ERROR)
    assert "main.c:5:" in report.message and "deliberately broken" in report.message


def test_maps_are_declared_by_the_source_and_settable():
    backend = FakeBackend(interfaces=["veth0"])
    backend.apply(unit())
    assert backend.read_map("demo", "counts") == []
    backend.set_map("demo", "counts", {bytes([10, 0, 0, 1]): [5]})
    (entry,) = backend.read_map("demo", "counts", Layout("ipv4"))
    assert (entry.key, entry.values) == ("10.0.0.1", (5,))
    assert {s.name for s in backend.program_stats("demo")} == {"on_xdp", "on_open"}
    with pytest.raises(MapNotFound, match="it has: counts, totals"):
        backend.read_map("demo", "nope")
    with pytest.raises(UnitNotFound):
        backend.read_map("other", "counts")


def test_a_second_units_xdp_program_on_an_interface_is_unsupported_on_node():
    backend = FakeBackend()

    def xdp(key: str) -> ProgramUnit:
        return ProgramUnit(
            key,
            "int count(struct xdp_md *ctx) { return 2; }",
            programs=[AttachSpec("count", "xdp", interfaces=["eth0"])],
        )

    (first,) = backend.apply(xdp("first"))
    (second,) = backend.apply(xdp("second"))
    assert first.phase == Phase.ATTACHED
    assert (second.phase, second.reason) == (Phase.FAILED, Reason.UNSUPPORTED_ON_NODE)
    assert second.message.startswith("xdp/native:eth0: BpfProgram first already runs an XDP program there;")
    assert backend.apply(xdp("first")) == [first], "the holder keeps the interface across re-applies"
    backend.remove("first")
    assert backend.apply(xdp("second"))[0].phase == Phase.ATTACHED
