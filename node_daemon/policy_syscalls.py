"""bpf(2) operations the policy datapath needs that bpf_syscalls.py does not offer (yet).

Map element writes, a ring buffer consumer, and a tcx attach at the head of the chain.
They are generic: candidates to move into bpf_syscalls.py, whose errors they share.
"""

from __future__ import annotations

import ctypes as ct
import errno
import struct
from collections.abc import Callable
from typing import Any

from beekeeper.node_daemon.bpf_syscalls import BPF_F_BEFORE, BpfError, OwnedFd

_libbpf = ct.CDLL("libbpf.so.1", use_errno=True)
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long

_SYS_BPF = 321  # x86_64, like bpf_syscalls
_BPF_LINK_CREATE = 28
BPF_NOEXIST = 1


def _proto(name: str, restype: type | None, *argtypes: type) -> Callable[..., Any]:
    fn = getattr(_libbpf, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


_map_update_elem = _proto("bpf_map_update_elem", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64)
_map_delete_elem = _proto("bpf_map_delete_elem", ct.c_int, ct.c_int, ct.c_void_p)
_map_lookup_elem = _proto("bpf_map_lookup_elem", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p)

_SampleFn = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_ring_buffer_new = _proto("ring_buffer__new", ct.c_void_p, ct.c_int, _SampleFn, ct.c_void_p, ct.c_void_p)
_ring_buffer_poll = _proto("ring_buffer__poll", ct.c_int, ct.c_void_p, ct.c_int)
_ring_buffer_free = _proto("ring_buffer__free", None, ct.c_void_p)


def _check(ret: int, what: str) -> int:
    if ret >= 0:
        return ret
    raise BpfError(-ret if ret < -1 else (ct.get_errno() or errno.EIO), what)


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _check(_map_update_elem(fd, key, value, flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one element; False if it was not there."""
    ret = _map_delete_elem(fd, key)
    if ret < 0 and -ret == errno.ENOENT:
        return False
    _check(ret, "map delete")
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ct.create_string_buffer(value_size)
    ret = _map_lookup_elem(fd, key, value)
    if ret < 0 and -ret == errno.ENOENT:
        return None
    _check(ret, "map lookup")
    return value.raw


def tcx_link_create_first(prog_fd: int, ifindex: int, attach_type: int) -> OwnedFd:
    """BPF_LINK_CREATE for tcx, placed at the head of the hook's chain.

    BPF_F_BEFORE without a relative object means "before everything", so a program that
    must see packets before any other (a policy) keeps that place whatever was attached
    earlier.
    """
    attr = ct.create_string_buffer(64)
    # union bpf_attr.link_create: prog_fd, target_ifindex, attach_type, flags, tcx.relative_fd
    struct.pack_into("<IIIII", attr, 0, prog_fd, ifindex, attach_type, BPF_F_BEFORE, 0)
    fd = _libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, attr, ct.sizeof(attr))
    return OwnedFd(_check(fd, "tcx attach"))


class RingBufferReader:
    """A consumer of a BPF ring buffer map (libbpf's ring_buffer); one per map and process.

    The consumer position lives in the map, so two readers of one map split its records.
    """

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        self._on_record = on_record
        self._callback = _SampleFn(self._sample)  # referenced for as long as libbpf may call it
        self._rb: int | None = _ring_buffer_new(map_fd, self._callback, None, None)
        if not self._rb:
            raise BpfError(ct.get_errno() or errno.EINVAL, "open ring buffer")

    def _sample(self, _ctx: int | None, data: int, size: int) -> int:
        self._on_record(ct.string_at(data, size))
        return 0

    def poll(self, timeout_ms: int) -> int:
        """Hand every available record to on_record, waiting up to timeout_ms for the first."""
        if self._rb is None:
            raise ValueError("ring buffer reader is closed")
        ret = _ring_buffer_poll(self._rb, timeout_ms)
        if ret < 0 and -ret == errno.EINTR:
            return 0
        return _check(ret, "poll ring buffer")

    def close(self) -> None:
        if self._rb is not None:
            _ring_buffer_free(self._rb)
            self._rb = None
