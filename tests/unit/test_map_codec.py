"""Decoding map keys and values for metrics."""

from __future__ import annotations

import struct

import pytest

from beekeeper.node_daemon.map_codec import Field, Layout, default_layout, value_ints


def test_scalar_layouts():
    assert Layout("uint").decode((70000).to_bytes(4, "little")) == 70000
    assert Layout("int").decode((-2).to_bytes(8, "little", signed=True)) == -2
    assert Layout("ipv4").decode(bytes([10, 222, 0, 1])) == "10.222.0.1"
    assert Layout("ipv6").decode(bytes(15) + b"\x01") == "::1"
    assert Layout("string").decode(b"eth0\0\0\0\0") == "eth0"
    assert Layout("hex").decode(b"\x01\xff") == "01ff"
    assert default_layout(4) == Layout("uint")
    assert default_layout(12) == Layout("hex")


def test_struct_layout_follows_c_alignment():
    # struct { u8 proto; u32 saddr (ipv4); u16 dport (network order); u64 cookie; }
    raw = struct.pack("<B3x4s", 6, bytes([10, 0, 0, 7])) + struct.pack(">H6x", 8080) + struct.pack("<Q", 99)
    layout = Layout(
        "struct",
        [Field("proto", "u8"), Field("saddr", "ipv4"), Field("dport", "be16"), Field("cookie", "u64")],
    )
    assert [f.offset for f in layout.fields_with_offsets()] == [0, 4, 8, 16]
    assert layout.decode(raw) == {"proto": 6, "saddr": "10.0.0.7", "dport": 8080, "cookie": 99}


def test_struct_layout_accepts_explicit_offsets_and_sized_fields():
    raw = b"xx" + b"comm\0\0\0\0" + (5).to_bytes(4, "little")
    layout = Layout("struct", [Field("comm", "string", size=8, offset=2), Field("pid", "u32", offset=10)])
    assert layout.decode(raw) == {"comm": "comm", "pid": 5}


def test_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match="kind must be one of"):
        Field("x", "float")
    with pytest.raises(ValueError, match="needs a size"):
        Field("x", "string")
    with pytest.raises(ValueError, match="needs fields"):
        Layout("struct")
    with pytest.raises(ValueError, match="past the 4-byte key"):
        Layout("struct", [Field("a", "u64")]).decode(bytes(4))


def test_values_as_words_and_per_cpu_sums():
    assert value_ints(struct.pack("<QQ", 3, 4), 16) == (3, 4)
    assert value_ints(struct.pack("<I", 7), 4) == (7,)
    assert value_ints(struct.pack("<III", 1, 2, 3), 12) == (1, 2, 3)
    # a 4-byte per-CPU value occupies 8 bytes per CPU
    assert value_ints(struct.pack("<IxxxxIxxxxIxxxx", 1, 2, 3), 4, per_cpu_slots=3) == (6,)
    assert value_ints(struct.pack("<QQQQ", 1, 10, 2, 20), 16, per_cpu_slots=2) == (3, 30)
