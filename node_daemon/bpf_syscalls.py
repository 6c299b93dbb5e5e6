"""ctypes bindings for the kernel objects the node daemon keeps: programs, maps, links, pins.

bcc compiles and loads, but every attachment it makes dies with the process. Attachments
that must survive a daemon restart are BPF links pinned in bpffs, created here through
libbpf.so.1's low-level API (thin wrappers of bpf(2)). The one exception is the tcx link:
libbpf 1.1 predates tcx (Linux 6.6) and cannot pass its relative-position fields, so that
single command goes through the raw bpf(2) syscall. perf_event_open(2) has no libc
wrapper, so it is a raw syscall too. Every function raises BpfError (an OSError with the
errno) on failure; fds are returned as OwnedFd so callers close them deterministically.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self

_libbpf = ct.CDLL("libbpf.so.1", use_errno=True)
_libc = ct.CDLL(None, use_errno=True)

# x86_64 syscall numbers (the only architecture this daemon is built for today).
_SYS_BPF = 321
_SYS_PERF_EVENT_OPEN = 298

# enum bpf_cmd
_BPF_LINK_CREATE = 28

# enum bpf_prog_type
PROG_TYPE_KPROBE = 2
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_XDP = 6
PROG_TYPE_CGROUP_SKB = 8
PROG_TYPE_RAW_TRACEPOINT = 17
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_TRACING = 26
PROG_TYPE_LSM = 29

# enum bpf_attach_type
ATTACH_CGROUP_INET_INGRESS = 0
ATTACH_CGROUP_INET_EGRESS = 1
ATTACH_CGROUP_INET4_BIND = 8
ATTACH_CGROUP_INET6_BIND = 9
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP6_SENDMSG = 15
ATTACH_CGROUP_UDP4_RECVMSG = 19
ATTACH_CGROUP_UDP6_RECVMSG = 20
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_CGROUP_INET6_GETPEERNAME = 30
ATTACH_CGROUP_INET4_GETSOCKNAME = 31
ATTACH_CGROUP_INET6_GETSOCKNAME = 32
ATTACH_TRACE_FENTRY = 24
ATTACH_TRACE_FEXIT = 25
ATTACH_LSM_MAC = 27
ATTACH_XDP = 37
ATTACH_PERF_EVENT = 41
ATTACH_TCX_INGRESS = 46
ATTACH_TCX_EGRESS = 47

# enum bpf_link_type
LINK_TYPE_CGROUP = 3
LINK_TYPE_XDP = 6
LINK_TYPE_TCX = 11

# enum bpf_map_type values whose lookups return one value slot per possible CPU
PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
ARRAY_MAP_TYPES = frozenset({2, 6})  # ARRAY, PERCPU_ARRAY: every slot always exists

# link / attach flags
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_F_BEFORE = 1 << 3
BPF_F_LINK = 1 << 13

_PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_TYPE_TRACEPOINT = 2


class BpfError(OSError):
    """A bpf(2) or perf_event_open(2) call failed; errno says why, the text says which call."""

    errno: int  # always set, unlike a plain OSError's

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")


def _check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno directly; raw syscalls return -1 and set errno."""
    if ret >= 0:
        return ret
    err = -ret if ret < -1 else (ct.get_errno() or errno.EIO)
    raise BpfError(err, what)


class OwnedFd:
    """A file descriptor this process must close; usable as a context manager."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# --- libbpf prototypes -------------------------------------------------------------------


class _LinkCreateOpts(ct.Structure):
    # Prefix of struct bpf_link_create_opts; sz tells libbpf the later fields are zero.
    _fields_ = (("sz", ct.c_size_t), ("flags", ct.c_uint32))


class _ProgLoadOpts(ct.Structure):
    # Prefix of struct bpf_prog_load_opts up to attach_btf_id.
    _fields_ = (
        ("sz", ct.c_size_t),
        ("attempts", ct.c_int),
        ("expected_attach_type", ct.c_uint32),
        ("prog_btf_fd", ct.c_uint32),
        ("prog_flags", ct.c_uint32),
        ("prog_ifindex", ct.c_uint32),
        ("kern_version", ct.c_uint32),
        ("attach_btf_id", ct.c_uint32),
    )


def libbpf_function(name: str, restype: type | None, *argtypes: type) -> Callable[..., Any]:
    """A typed function of the system libbpf (errno is kept for callers: use_errno)."""
    fn = getattr(_libbpf, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


_proto = libbpf_function  # the short name this module's prototypes use


_u32p = ct.POINTER(ct.c_uint32)
_obj_pin = _proto("bpf_obj_pin", ct.c_int, ct.c_int, ct.c_char_p)
_obj_get = _proto("bpf_obj_get", ct.c_int, ct.c_char_p)
_link_create = _proto("bpf_link_create", ct.c_int, ct.c_int, ct.c_int, ct.c_int, ct.POINTER(_LinkCreateOpts))
_link_update = _proto("bpf_link_update", ct.c_int, ct.c_int, ct.c_int, ct.c_void_p)
_link_detach = _proto("bpf_link_detach", ct.c_int, ct.c_int)
_raw_tracepoint_open = _proto("bpf_raw_tracepoint_open", ct.c_int, ct.c_char_p, ct.c_int)
_obj_get_info_by_fd = _proto("bpf_obj_get_info_by_fd", ct.c_int, ct.c_int, ct.c_void_p, _u32p)
_map_get_next_key = _proto("bpf_map_get_next_key", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p)
_map_lookup_elem = _proto("bpf_map_lookup_elem", ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p)
_prog_load = _proto(
    "bpf_prog_load",
    ct.c_int,
    ct.c_int,
    ct.c_char_p,
    ct.c_char_p,
    ct.c_void_p,
    ct.c_size_t,
    ct.POINTER(_ProgLoadOpts),
)
_probe_prog_type = _proto("libbpf_probe_bpf_prog_type", ct.c_int, ct.c_int, ct.c_void_p)
_enable_stats = _proto("bpf_enable_stats", ct.c_int, ct.c_int)
_num_possible_cpus = _proto("libbpf_num_possible_cpus", ct.c_int)
_NEXT_ID = {
    "prog": _proto("bpf_prog_get_next_id", ct.c_int, ct.c_uint32, _u32p),
    "map": _proto("bpf_map_get_next_id", ct.c_int, ct.c_uint32, _u32p),
    "link": _proto("bpf_link_get_next_id", ct.c_int, ct.c_uint32, _u32p),
    "btf": _proto("bpf_btf_get_next_id", ct.c_int, ct.c_uint32, _u32p),
}

_libc.syscall.restype = ct.c_long


# --- pins and objects --------------------------------------------------------------------


def obj_pin(fd: int, path: str) -> None:
    """Pin a program, map or link at path (in bpffs) so it outlives this process."""
    _check(_obj_pin(fd, os.fsencode(path)), f"pin at {path}")


def obj_get(path: str) -> OwnedFd:
    """Open the object pinned at path."""
    return OwnedFd(_check(_obj_get(os.fsencode(path)), f"open pin {path}"))


def object_ids(kind: str) -> list[int]:
    """Ids of every kernel object of a kind ("prog", "map", "link", "btf"); for leak checks."""
    next_id = _NEXT_ID[kind]
    ids: list[int] = []
    cur = ct.c_uint32(0)
    while next_id(cur.value, ct.byref(cur)) == 0:
        ids.append(cur.value)
    return ids


# --- object info -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    run_time_ns: int
    run_cnt: int
    btf_id: int


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    btf_id: int
    flags: int = 0


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    ifindex: int  # xdp and tcx links; 0 once the device is gone
    cgroup_id: int  # cgroup links; 0 once the cgroup is gone


def _info(fd: int, size: int, what: str) -> bytes:
    buf = ct.create_string_buffer(size)
    length = ct.c_uint32(size)
    _check(_obj_get_info_by_fd(fd, buf, ct.byref(length)), what)
    return buf.raw


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232, "program info")  # sizeof(struct bpf_prog_info) in Linux 6.1 uapi
    ptype, pid = struct.unpack_from("<II", raw, 0)
    run_time_ns, run_cnt = struct.unpack_from("<QQ", raw, 192)
    btf_id = struct.unpack_from("<I", raw, 128)[0]
    return ProgInfo(pid, ptype, _cstr(raw[64:80]), run_time_ns, run_cnt, btf_id)


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88, "map info")
    mtype, mid, key_size, value_size, max_entries, flags = struct.unpack_from("<IIIIII", raw, 0)
    btf_id = struct.unpack_from("<I", raw, 64)[0]
    return MapInfo(mid, mtype, key_size, value_size, max_entries, _cstr(raw[24:40]), btf_id, flags)


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 48, "link info")
    ltype, lid, prog_id = struct.unpack_from("<III", raw, 0)
    ifindex = struct.unpack_from("<I", raw, 16)[0] if ltype in (LINK_TYPE_XDP, LINK_TYPE_TCX) else 0
    cgroup_id = struct.unpack_from("<Q", raw, 16)[0] if ltype == LINK_TYPE_CGROUP else 0
    return LinkInfo(id=lid, type=ltype, prog_id=prog_id, ifindex=ifindex, cgroup_id=cgroup_id)


# --- links -------------------------------------------------------------------------------


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0, what: str = "attach") -> OwnedFd:
    """BPF_LINK_CREATE for xdp (target = ifindex), cgroup (target = cgroup fd), perf events."""
    opts = _LinkCreateOpts(sz=ct.sizeof(_LinkCreateOpts), flags=flags)
    return OwnedFd(_check(_link_create(prog_fd, target_fd, attach_type, ct.byref(opts)), what))


def tcx_link_create(prog_fd: int, ifindex: int, attach_type: int, before_link_fd: int | None = None) -> OwnedFd:
    """BPF_LINK_CREATE for tcx; appended to the hook's chain, or placed before another link."""
    attr = ct.create_string_buffer(64)
    flags, relative = (BPF_F_BEFORE | BPF_F_LINK, before_link_fd) if before_link_fd is not None else (0, 0)
    # union bpf_attr.link_create: prog_fd, target_ifindex, attach_type, flags, tcx.relative_fd
    struct.pack_into("<IIIII", attr, 0, prog_fd, ifindex, attach_type, flags, relative)
    fd = _libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, attr, ct.sizeof(attr))
    return OwnedFd(_check(fd, "tcx attach"))


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link atomically: no packet or event sees no program."""
    _check(_link_update(link_fd, new_prog_fd, None), "link update")


def link_detach(link_fd: int) -> None:
    """Detach a link now, even if another holder still has it open."""
    _check(_link_detach(link_fd), "link detach")


def raw_tracepoint_open(name: str, prog_fd: int) -> OwnedFd:
    return OwnedFd(_check(_raw_tracepoint_open(name.encode(), prog_fd), f"raw tracepoint {name}"))


def perf_event_open(pmu_type: int, config: int, config1: int = 0, config2: int = 0, pid: int = -1) -> OwnedFd:
    """Open a perf event to hang a BPF program on (tracepoint, kprobe or uprobe PMU).

    pid -1 means every process; the event is then bound to CPU 0, which for tracing
    events does not filter anything (the BPF program runs on whichever CPU hits it).
    """
    attr = ct.create_string_buffer(112)  # PERF_ATTR_SIZE_VER5, covers config2
    struct.pack_into("<IIQQ", attr, 0, pmu_type, 112, config, 1)  # type, size, config, sample_period
    struct.pack_into("<I", attr, 48, 1)  # wakeup_events
    struct.pack_into("<QQ", attr, 56, config1, config2)
    cpu = 0 if pid == -1 else -1
    fd = _libc.syscall(
        _SYS_PERF_EVENT_OPEN, attr, ct.c_int(pid), ct.c_int(cpu), ct.c_int(-1), ct.c_ulong(_PERF_FLAG_FD_CLOEXEC)
    )
    return OwnedFd(_check(fd, "perf_event_open"))


# --- maps --------------------------------------------------------------------------------


def map_items(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a map; for per-CPU maps value_size must cover all CPUs.

    Entries deleted between get_next_key and lookup are skipped, which is what a metrics
    scrape of a live map wants.
    """
    key = ct.create_string_buffer(key_size)
    next_key = ct.create_string_buffer(key_size)
    value = ct.create_string_buffer(value_size)
    prev: ct.Array[ct.c_char] | None = None
    while True:
        ret = _map_get_next_key(fd, prev, next_key)
        if ret < 0:
            if -ret == errno.ENOENT:
                return
            _check(ret, "map iteration")
        ct.memmove(key, next_key, key_size)
        prev = key
        ret = _map_lookup_elem(fd, key, value)
        if ret == 0:
            yield key.raw, value.raw
        elif -ret != errno.ENOENT:
            _check(ret, "map lookup")


def possible_cpus() -> int:
    return _check(_num_possible_cpus(), "count possible CPUs")


# --- feature probes ----------------------------------------------------------------------

_RETURN_ZERO = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 0; exit


def prog_type_supported(prog_type: int) -> bool:
    return _probe_prog_type(prog_type, None) == 1


def load_trivial_prog(prog_type: int, expected_attach_type: int = 0, attach_btf_id: int = 0) -> OwnedFd:
    """A program that returns 0: used to probe which attach commands (and, with the BTF id of a
    kernel function, which BTF-attached program types) this kernel accepts."""
    insns = ct.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    opts = _ProgLoadOpts(
        sz=ct.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type, attach_btf_id=attach_btf_id
    )
    fd = _prog_load(prog_type, b"bk_probe", b"GPL", insns, 2, ct.byref(opts))
    return OwnedFd(_check(fd, "load probe program"))


def enable_run_time_stats() -> OwnedFd:
    """Turn on per-program run_cnt/run_time_ns accounting for as long as the fd stays open."""
    return OwnedFd(_check(_enable_stats(0), "enable BPF run-time stats"))  # BPF_STATS_RUN_TIME


# --- objects by id (what another process attached) ---------------------------------------

_prog_get_fd_by_id = _proto("bpf_prog_get_fd_by_id", ct.c_int, ct.c_uint32)
_map_get_fd_by_id = _proto("bpf_map_get_fd_by_id", ct.c_int, ct.c_uint32)
_xdp_query_id = _proto("bpf_xdp_query_id", ct.c_int, ct.c_int, ct.c_int, _u32p)

BPF_F_RDONLY_PROG = 1 << 7


def prog_by_id(prog_id: int) -> OwnedFd:
    return OwnedFd(_check(_prog_get_fd_by_id(prog_id), f"open program id {prog_id}"))


def map_by_id(map_id: int) -> OwnedFd:
    return OwnedFd(_check(_map_get_fd_by_id(map_id), f"open map id {map_id}"))


def prog_map_ids(fd: int, limit: int = 64) -> list[int]:
    """Ids of the maps a program uses (struct bpf_prog_info nr_map_ids / map_ids)."""
    ids = (ct.c_uint32 * limit)()
    buf = ct.create_string_buffer(232)
    struct.pack_into("<IQ", buf, 52, limit, ct.addressof(ids))
    length = ct.c_uint32(232)
    _check(_obj_get_info_by_fd(fd, buf, ct.byref(length)), "program info")
    count = struct.unpack_from("<I", buf.raw, 52)[0]
    return list(ids[: min(count, limit)])


def map_flags(fd: int) -> int:
    return struct.unpack_from("<I", _info(fd, 88, "map info"), 20)[0]


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes:
    value = ct.create_string_buffer(value_size)
    _check(_map_lookup_elem(fd, ct.create_string_buffer(key, len(key)), value), "map lookup")
    return value.raw


def xdp_attached_prog_id(ifindex: int) -> int:
    """Id of the XDP program on an interface (any mode), 0 when there is none."""
    prog_id = ct.c_uint32(0)
    _check(_xdp_query_id(ifindex, 0, ct.byref(prog_id)), f"query XDP program of ifindex {ifindex}")
    return prog_id.value
