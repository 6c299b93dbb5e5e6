"""The backend vocabulary: spec validation and what counts as a new build."""

from __future__ import annotations

import pytest

from beekeeper.node_daemon.backend import AttachSpec, ProgramUnit


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (AttachSpec("f", "xdp"), "needs interfaces or an interface pattern"),
        (AttachSpec("f", "xdp", interfaces=["eth0"], xdp_mode="offload"), "xdp mode must be native or generic"),
        (AttachSpec("f", "tc", interfaces=["eth0"], direction="sideways"), "direction must be ingress or egress"),
        (AttachSpec("f", "tracepoint", tracepoint="sys_enter_openat"), "must be category:name"),
        (AttachSpec("f", "raw_tracepoint"), "needs a tracepoint"),
        (AttachSpec("f", "raw_tracepoint", tracepoint="../x"), "bare tracepoint name"),
        (AttachSpec("f", "tracepoint", tracepoint="a:../../b"), "must be category:name"),
        (AttachSpec("f", "uprobe", binary="/bin/true"), "needs a binary and a symbol or offset"),
        (AttachSpec("f", "kretprobe"), "needs a kernel function"),
        (AttachSpec("f", "cgroup_skb"), "needs a cgroup path"),
        (AttachSpec("f", "cgroup_sock_addr", cgroup_path="/x", attach_type="accept4"), "must be one of"),
    ],
)
def test_invalid_specs_say_what_is_wrong(spec, problem):
    assert problem in spec.problem()


def test_valid_specs_have_no_problem():
    assert AttachSpec("f", "tracepoint", tracepoint="syscalls/sys_enter_openat").problem() is None
    assert AttachSpec("f", "uprobe", binary="c", offset=0x40).problem() is None
    assert AttachSpec("f", "cgroup_sock_addr", cgroup_path="pods", attach_type="connect6").problem() is None


def test_unknown_types_are_rejected_at_construction():
    with pytest.raises(ValueError):
        AttachSpec("f", "lsm")


def test_content_hash_covers_code_not_attach_targets():
    base = ProgramUnit("u", "int f(void *c) { return 0; }", ["-DX=1"], [AttachSpec("f", "xdp", interfaces=["a"])])
    moved = ProgramUnit("u", base.source, base.cflags, [AttachSpec("f", "xdp", interfaces=["b"], xdp_mode="generic")])
    assert moved.content_hash == base.content_hash, "attach targets converge in place, without a rebuild"
    for changed in (
        ProgramUnit("u", base.source + " ", base.cflags, base.programs),
        ProgramUnit("u", base.source, ["-DX=2"], base.programs),
        ProgramUnit("u", base.source, base.cflags, [AttachSpec("f", "tc", interfaces=["a"])]),
        ProgramUnit("u", base.source, base.cflags, [*base.programs, AttachSpec("f", "tracepoint", tracepoint="a:b")]),
    ):
        assert changed.content_hash != base.content_hash


def test_load_key_separates_expected_attach_types():
    ingress = AttachSpec("f", "cgroup_skb", cgroup_path="x", direction="ingress")
    egress = AttachSpec("f", "cgroup_skb", cgroup_path="x", direction="egress")
    assert ingress.load_key != egress.load_key
    assert AttachSpec("f", "uprobe", binary="c", symbol="a").load_key == "f:uprobe"
