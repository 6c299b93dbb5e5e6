"""The backend vocabulary: spec validation and what counts as a new build."""

from __future__ import annotations

import hashlib
import json

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
        AttachSpec("f", "struct_ops")


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


def test_source_units_hash_as_before_bytecode_existed():
    """An upgraded daemon must find its adopted source units unchanged (no reload)."""
    unit = ProgramUnit("u", "int f(void *c) { return 0; }", ["-DX=1"], [AttachSpec("f", "xdp", interfaces=["a"])])
    doc = {"source": unit.source, "cflags": ["-DX=1"], "loads": ["f:xdp"]}
    assert unit.content_hash == hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def test_bytecode_units_hash_the_object_and_global_data():
    spec = AttachSpec("f", "tracepoint", tracepoint="a:b")
    base = ProgramUnit("u", bytecode=b"\x7fELF-1", global_data=(("b", b"\2"), ("a", b"\1")), programs=[spec])
    assert base.global_data == (("a", b"\1"), ("b", b"\2")), "order of globalData does not matter"
    same = ProgramUnit("u", bytecode=b"\x7fELF-1", global_data=(("a", b"\1"), ("b", b"\2")), programs=[spec])
    assert same.content_hash == base.content_hash
    for changed in (
        ProgramUnit("u", bytecode=b"\x7fELF-2", global_data=base.global_data, programs=[spec]),
        ProgramUnit("u", bytecode=b"\x7fELF-1", global_data=(("a", b"\1"),), programs=[spec]),
        ProgramUnit("u", bytecode=b"\x7fELF-1", global_data=(("a", b"\1"), ("b", b"\3")), programs=[spec]),
    ):
        assert changed.content_hash != base.content_hash


def test_a_unit_has_exactly_one_code_source():
    with pytest.raises(ValueError, match="exactly one of source or bytecode"):
        ProgramUnit("u", "int x;", bytecode=b"\x7fELF")
    with pytest.raises(ValueError, match="exactly one of source or bytecode"):
        ProgramUnit("u")


def test_btf_attached_types_need_a_target_and_load_per_target():
    assert AttachSpec("f", "fentry").problem() == "fentry program 'f' needs a kernel function"
    assert AttachSpec("f", "lsm").problem() == "lsm program 'f' needs a kernel hook"
    assert AttachSpec("f", "fexit", btf_target="do_unlinkat").load_key == "f:fexit:do_unlinkat"
