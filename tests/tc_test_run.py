"""Crafted packets through a tc program with BPF_PROG_TEST_RUN: the kernel tests' verdicts and the
datapath bench's ns per packet come from this one binding."""

from __future__ import annotations

import ctypes as ct
import os
import socket
import struct

PASS, DROP = "pass", "drop"
TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2  # tcx "next" / drop
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1
SYN, RST, ACK = 0x02, 0x04, 0x10


class _TestRunOpts(ct.Structure):
    _fields_ = (
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    )


_test_run = ct.CDLL("libbpf.so.1", use_errno=True).bpf_prog_test_run_opts
_test_run.argtypes = (ct.c_int, ct.POINTER(_TestRunOpts))
_test_run.restype = ct.c_int
_SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff)
_SKB_IFINDEX_OFFSET = 40


def prog_test_run(prog_fd: int, packet: bytes, ifindex: int, repeat: int = 1) -> tuple[int, float]:
    """(tc verdict, kernel-measured ns per run) of a tc program on packet as if it crossed ifindex
    (the kernel sets skb->dev from it), run `repeat` times."""
    ctx = ct.create_string_buffer(_SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, _SKB_IFINDEX_OFFSET, ifindex)
    data = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    opts = _TestRunOpts(
        sz=ct.sizeof(_TestRunOpts),
        data_in=ct.addressof(data),
        data_out=ct.addressof(out),
        data_size_in=len(packet),
        data_size_out=len(out),
        ctx_in=ct.addressof(ctx),
        ctx_size_in=_SKB_CTX_SIZE,
        repeat=repeat,
    )
    ret = _test_run(prog_fd, ct.byref(opts))
    if ret != 0:
        raise OSError(-ret, f"BPF_PROG_TEST_RUN failed: {os.strerror(-ret)}")
    return opts.retval, float(opts.duration)


def run_prog(prog_fd: int, packet: bytes, ifindex: int) -> str:
    """PASS or DROP: the verdict of a tc program on one packet."""
    verdict, _ = prog_test_run(prog_fd, packet, ifindex)
    assert verdict in (TC_ACT_UNSPEC, TC_ACT_SHOT), f"unexpected tc verdict {verdict:#x}"
    return PASS if verdict == TC_ACT_UNSPEC else DROP


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag_offset: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        frag_offset // 8,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + payload


def l4(proto: int, sport: int, dport: int, flags: int) -> bytes:
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if proto == UDP:
        return struct.pack("!HHHH", sport, dport, 12, 0) + b"data"
    if proto == SCTP:
        return struct.pack("!HHII", sport, dport, 7, 0)
    return b"\0" * 8


def eth(payload: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02" + struct.pack("!H", ethertype) + payload


def packet(src: str, dst: str, proto: int = TCP, sport: int = 40000, dport: int = 8080, flags: int = SYN) -> bytes:
    return eth(ipv4(src, dst, proto, l4(proto, sport, dport, flags)))


def icmp(src: str, dst: str, icmp_type: int, echo_id: int = 0, inner: bytes = b"") -> bytes:
    return eth(ipv4(src, dst, ICMP, struct.pack("!BBHHH", icmp_type, 0, 0, echo_id, 1) + inner))
