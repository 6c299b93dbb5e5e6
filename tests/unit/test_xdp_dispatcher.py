"""libxdp's dispatcher protocol as beekeeper encodes it: config layout, chain masks, run order."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from beekeeper.node_daemon.backend import HookSupport
from beekeeper.node_daemon.xdp_dispatcher import (
    CONFIG,
    MAGIC,
    RETVAL,
    SLOTS,
    VERSION,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    Component,
    DispatcherConfig,
    DispatcherError,
    Occupant,
    chain_mask,
    config_for,
    pin_dir,
    refusal,
    run_order,
)

DISPATCHER_C = Path(__file__).resolve().parents[2] / "bpf" / "xdp_dispatcher.c"
_C_TYPES = {"__u8": "B", "__u32": "I"}


def _c_source() -> str:
    return DISPATCHER_C.read_text()


def test_numbers_match_the_c_source() -> None:
    defines = dict(re.findall(r"^#define (DISPATCHER_\w+) (\d+)", _c_source(), re.M))
    assert int(defines["DISPATCHER_VERSION"]) == VERSION == 3
    assert int(defines["DISPATCHER_MAGIC"]) == MAGIC == ord("X") + ord("D") + ord("P")
    assert int(defines["DISPATCHER_RETVAL"]) == RETVAL
    assert int(defines["DISPATCHER_SLOTS"]) == SLOTS
    for i in range(SLOTS):
        assert f"STUB(prog{i})" in _c_source() and f"SLOT({i}, prog{i})" in _c_source()


def test_config_layout_matches_the_c_struct() -> None:
    """The struct's members in order, laid out by C's rules, give Python's struct format."""
    body = re.search(r"struct xdp_dispatcher_config \{(.*?)\};", _c_source(), re.S).group(1)
    fmt = "@"  # native alignment, as clang lays out the BPF struct
    for ctype, _name, count in re.findall(r"(__u8|__u32) (\w+)(?:\[(\w+)\])?;", body):
        fmt += (str(SLOTS) if count else "") + _C_TYPES[ctype]
    size = struct.calcsize(fmt + "0I")  # trailing padding to the struct's alignment
    assert size == CONFIG.size == 128
    assert struct.unpack(fmt, DispatcherConfig().pack()[: struct.calcsize(fmt)])[:2] == (MAGIC, VERSION)


def test_config_round_trips() -> None:
    config = config_for([Component("b", 20, frozenset({XDP_PASS, XDP_DROP}), frags=True), Component("a", 10)])
    assert DispatcherConfig.unpack(config.pack()) == config


def test_config_orders_slots_and_pads() -> None:
    config = config_for([Component("late", 60), Component("early", 10, frozenset({XDP_PASS, XDP_TX}))])
    assert config.num_progs_enabled == 2
    assert config.run_prios == (10, 60) + (0,) * (SLOTS - 2)
    assert config.chain_call_actions[:3] == (1 << RETVAL | 1 << XDP_PASS | 1 << XDP_TX, 1 << RETVAL | 1 << XDP_PASS, 0)
    assert not config.is_xdp_frags, "frags only when every component supports them"
    assert config_for([Component("a", frags=True)]).is_xdp_frags
    assert config_for([Component("a", frags=True)]).program_flags[0] == 1 << 5  # BPF_F_XDP_HAS_FRAGS


def test_run_order_is_priority_then_name() -> None:
    names = [c.name for c in run_order([Component("c", 50), Component("b", 50), Component("a", 70), Component("z", 1)])]
    assert names == ["z", "b", "c", "a"]


def test_chain_mask_always_continues_past_empty_stubs() -> None:
    assert chain_mask([]) == 1 << RETVAL
    with pytest.raises(ValueError, match="XDP action 9"):
        chain_mask([9])


def test_too_many_programs_for_the_slots() -> None:
    with pytest.raises(DispatcherError, match="10 slots"):
        config_for([Component(f"p{i}") for i in range(SLOTS + 1)])


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (bytes(CONFIG.size), "no dispatcher magic"),
        (bytes([MAGIC, 2]) + bytes(CONFIG.size - 2), "version 2, older than the version 3"),
        (bytes([MAGIC, 4]) + bytes(CONFIG.size - 2), "version 4, newer than"),
        (bytes([MAGIC, VERSION, 0, 0]), "expected 128"),
    ],
)
def test_other_dispatchers_are_refused_with_the_reason(raw: bytes, match: str) -> None:
    with pytest.raises(DispatcherError, match=match):
        DispatcherConfig.unpack(raw)


def test_pin_layout_is_libxdps() -> None:
    assert pin_dir("/sys/fs/bpf", 7, 1234) == Path("/sys/fs/bpf/xdp/dispatch-7-1234")


def test_refusal_names_the_holder_and_the_kernels_answer() -> None:
    no = HookSupport(False, "the kernel refuses freplace extension programs: Operation not permitted")
    ours = refusal("xdp/generic:veth0", Occupant(11, "count_a"), "a", no)
    assert "BpfProgram a already runs XDP program count_a (id 11)" in ours
    assert ours.endswith(
        "which this node cannot run: the kernel refuses freplace extension programs: Operation not permitted"
    )
    foreign = refusal("xdp/native:eth0", Occupant(12, "xdp_prog"), None, no)
    assert "attached outside beekeeper" in foreign
    old = refusal(
        "xdp/native:eth0",
        Occupant(13, "xdp_dispatcher", incompatible="it is a libxdp dispatcher of version 2"),
        None,
        no,
    )
    assert (
        "a libxdp dispatcher (id 13, 0 programs) holds it, and beekeeper cannot extend it: "
        "it is a libxdp dispatcher of version 2" in old
    )
