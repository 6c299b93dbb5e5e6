"""Where programs attach: resolving an AttachSpec to concrete targets, and attaching to them.

Every attachment is a BPF link, because only links can be pinned and so survive the
daemon process:

    xdp               BPF_LINK_CREATE, BPF_XDP on the ifindex (generic/native via flags)
    tc                BPF_LINK_CREATE, BPF_TCX_INGRESS/EGRESS on the ifindex (tcx, Linux 6.6)
    cgroup_skb        BPF_LINK_CREATE, BPF_CGROUP_INET_INGRESS/EGRESS on the cgroup fd
    cgroup_sock_addr  BPF_LINK_CREATE, BPF_CGROUP_INET4_CONNECT etc. on the cgroup fd
    tracepoint        perf_event_open(PERF_TYPE_TRACEPOINT) + BPF_LINK_CREATE, BPF_PERF_EVENT
    uprobe/kprobe     perf_event_open(uprobe/kprobe PMU) + BPF_LINK_CREATE, BPF_PERF_EVENT
    raw_tracepoint    BPF_RAW_TRACEPOINT_OPEN (returns a link)
    fentry/fexit/lsm  BPF_LINK_CREATE with the program's attach type (the target, a kernel
                      function or LSM hook, is fixed in the program at load: its attach BTF id)

xdp, tcx and cgroup links can swap their program atomically (BPF_LINK_UPDATE); perf-event
and raw tracepoint links cannot, so a new program is attached before the old is dropped.
"""

from __future__ import annotations

import ctypes as ct
import errno
import fnmatch
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.backend import AttachSpec, ProgramType, Reason
from beekeeper.node_daemon.capabilities import find_mount, fstype_of, pmu_type, retprobe_bit

SYS_CLASS_NET = "/sys/class/net"

_SOCK_ADDR_ATTACH = {
    "bind4": bpf.ATTACH_CGROUP_INET4_BIND,
    "bind6": bpf.ATTACH_CGROUP_INET6_BIND,
    "connect4": bpf.ATTACH_CGROUP_INET4_CONNECT,
    "connect6": bpf.ATTACH_CGROUP_INET6_CONNECT,
    "sendmsg4": bpf.ATTACH_CGROUP_UDP4_SENDMSG,
    "sendmsg6": bpf.ATTACH_CGROUP_UDP6_SENDMSG,
    "recvmsg4": bpf.ATTACH_CGROUP_UDP4_RECVMSG,
    "recvmsg6": bpf.ATTACH_CGROUP_UDP6_RECVMSG,
    "getpeername4": bpf.ATTACH_CGROUP_INET4_GETPEERNAME,
    "getpeername6": bpf.ATTACH_CGROUP_INET6_GETPEERNAME,
    "getsockname4": bpf.ATTACH_CGROUP_INET4_GETSOCKNAME,
    "getsockname6": bpf.ATTACH_CGROUP_INET6_GETSOCKNAME,
}
_SKB_ATTACH = {"ingress": bpf.ATTACH_CGROUP_INET_INGRESS, "egress": bpf.ATTACH_CGROUP_INET_EGRESS}
_TCX_ATTACH = {"ingress": bpf.ATTACH_TCX_INGRESS, "egress": bpf.ATTACH_TCX_EGRESS}

_PROG_TYPES = {
    ProgramType.XDP: bpf.PROG_TYPE_XDP,
    ProgramType.TC: bpf.PROG_TYPE_SCHED_CLS,
    ProgramType.TRACEPOINT: bpf.PROG_TYPE_TRACEPOINT,
    ProgramType.RAW_TRACEPOINT: bpf.PROG_TYPE_RAW_TRACEPOINT,
    ProgramType.UPROBE: bpf.PROG_TYPE_KPROBE,
    ProgramType.URETPROBE: bpf.PROG_TYPE_KPROBE,
    ProgramType.KPROBE: bpf.PROG_TYPE_KPROBE,
    ProgramType.KRETPROBE: bpf.PROG_TYPE_KPROBE,
    ProgramType.CGROUP_SKB: bpf.PROG_TYPE_CGROUP_SKB,
    ProgramType.CGROUP_SOCK_ADDR: bpf.PROG_TYPE_CGROUP_SOCK_ADDR,
}
_BTF_ATTACH = {
    ProgramType.FENTRY: (bpf.PROG_TYPE_TRACING, bpf.ATTACH_TRACE_FENTRY),
    ProgramType.FEXIT: (bpf.PROG_TYPE_TRACING, bpf.ATTACH_TRACE_FEXIT),
    ProgramType.LSM: (bpf.PROG_TYPE_LSM, bpf.ATTACH_LSM_MAC),
}

UPDATABLE_KINDS = frozenset({"xdp", "tcx", "cgroup"})
"""Link kinds whose program BPF_LINK_UPDATE can swap in place."""
EXCLUSIVE_KINDS = frozenset({"xdp"})
"""Link kinds with room for one program per target: a replacement must detach first."""


class TargetError(Exception):
    """A target that cannot be attached to; reason is a backend.Reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Target:
    """One concrete attachment of one program."""

    slot: str
    """Stable identity within a unit (function + hook + target); survives rebuilds."""
    point: str
    """Human attach point for status, e.g. "xdp/generic:veth0"."""
    kind: str
    """Link kind: xdp, tcx, cgroup, perf or raw_tp."""
    spec: AttachSpec
    params: dict[str, Any] = field(default_factory=dict)
    """Attach options; changing one needs a new link rather than a program swap."""
    ident: dict[str, Any] = field(default_factory=dict)
    """The resolved kernel object (ifindex, cgroup id, tracepoint id, probe file offset); if it
    changes (interface re-created, binary replaced) the old link points at nothing useful."""


@dataclass
class Resolution:
    targets: list[Target] = field(default_factory=list)
    errors: list[TargetError] = field(default_factory=list)
    no_match: str | None = None
    """Set when an interface pattern matched nothing (not an error: pods come and go)."""


@dataclass(frozen=True)
class Environment:
    tracefs: str | None
    cgroup2: str | None


def program_type(spec: AttachSpec) -> tuple[int, int | None]:
    """(bpf_prog_type, expected_attach_type or None) the spec's function must be loaded as."""
    if spec.type == ProgramType.CGROUP_SKB:
        return bpf.PROG_TYPE_CGROUP_SKB, _SKB_ATTACH[spec.direction]
    if spec.type == ProgramType.CGROUP_SOCK_ADDR:
        return bpf.PROG_TYPE_CGROUP_SOCK_ADDR, _SOCK_ADDR_ATTACH[str(spec.attach_type)]
    if spec.type in _BTF_ATTACH:
        return _BTF_ATTACH[spec.type]
    return _PROG_TYPES[spec.type], None


def resolve(spec: AttachSpec, env: Environment) -> Resolution:
    """Concrete targets of a spec on this node, now; problems become TargetErrors."""
    res = Resolution()
    try:
        if spec.type in (ProgramType.XDP, ProgramType.TC):
            _resolve_interfaces(spec, res)
        elif spec.type == ProgramType.TRACEPOINT:
            res.targets.append(_resolve_tracepoint(spec, env))
        elif spec.type == ProgramType.RAW_TRACEPOINT:
            point = f"raw_tracepoint:{spec.tracepoint}"
            res.targets.append(Target(f"{spec.name}@{point}", point, "raw_tp", spec))
        elif spec.type in (ProgramType.UPROBE, ProgramType.URETPROBE):
            res.targets.append(_resolve_uprobe(spec))
        elif spec.type in _BTF_ATTACH:
            point = f"{spec.type}:{spec.btf_target}"
            res.targets.append(Target(f"{spec.name}@{point}", point, "tracing", spec))
        elif spec.type in (ProgramType.KPROBE, ProgramType.KRETPROBE):
            where = f"{spec.symbol}+{spec.offset:#x}" if spec.offset else str(spec.symbol)
            point = f"{spec.type}:{where}"
            res.targets.append(Target(f"{spec.name}@{point}", point, "perf", spec))
        else:
            res.targets.append(_resolve_cgroup(spec, env))
    except TargetError as exc:
        res.errors.append(exc)
    return res


def _resolve_interfaces(spec: AttachSpec, res: Resolution) -> None:
    names = list(dict.fromkeys(spec.interfaces))
    if spec.interface_pattern:
        present = sorted(os.listdir(SYS_CLASS_NET))
        matched = [n for n in present if fnmatch.fnmatchcase(n, spec.interface_pattern) and n not in names]
        if not matched and not names:
            res.no_match = f"no interface on this node matches {spec.interface_pattern!r}"
        names += matched
    for name in names:
        try:
            ifindex = socket.if_nametoindex(name)
        except OSError:
            res.errors.append(TargetError(Reason.INTERFACE_NOT_FOUND, f"interface {name} does not exist on this node"))
            continue
        if spec.type == ProgramType.XDP:
            point = f"xdp/{spec.xdp_mode}:{name}"
            slot = f"{spec.name}@xdp:{name}"
            params: dict[str, Any] = {"mode": spec.xdp_mode}
            kind = "xdp"
        else:
            point = f"tcx/{spec.direction}:{name}"
            slot = f"{spec.name}@{point}"
            params = {"priority": spec.priority, "direction": spec.direction}
            kind = "tcx"
        res.targets.append(Target(slot, point, kind, spec, params, {"ifindex": ifindex}))


def _resolve_tracepoint(spec: AttachSpec, env: Environment) -> Target:
    category, name = str(spec.tracepoint).replace("/", ":").split(":")
    point = f"tracepoint:{category}:{name}"
    if env.tracefs is None:
        raise TargetError(Reason.UNSUPPORTED_ON_NODE, "tracefs is not mounted, so tracepoint ids are unknown")
    try:
        with open(os.path.join(env.tracefs, "events", category, name, "id")) as f:
            tp_id = int(f.read())
    except FileNotFoundError:
        raise TargetError(
            Reason.TRACEPOINT_NOT_FOUND,
            f"tracepoint {category}:{name} does not exist on this kernel (see {env.tracefs}/available_events)",
        ) from None
    return Target(f"{spec.name}@{point}", point, "perf", spec, {}, {"id": tp_id})


def _resolve_uprobe(spec: AttachSpec) -> Target:
    # libbcc resolves libraries and symbols; imported on the first uprobe only, so a daemon that
    # runs none never maps it (tens of MiB of RSS).
    from bcc import BPF, lib
    from bcc.libbcc import bcc_symbol, bcc_symbol_option

    binary = str(spec.binary)
    path = binary if "/" in binary else BPF.find_library(binary)
    if path is None or not os.path.exists(path):
        raise TargetError(Reason.BINARY_NOT_FOUND, f"{spec.type} binary {binary} does not exist on this node")
    path = os.fsdecode(path)
    offset = spec.offset
    if spec.symbol:
        sym = bcc_symbol()
        if (
            lib.bcc_resolve_symname(
                path.encode(),
                spec.symbol.encode(),
                0,
                spec.pid or 0,
                ct.POINTER(bcc_symbol_option)(),  # NULL: default options
                ct.byref(sym),
            )
            < 0
        ):
            raise TargetError(Reason.SYMBOL_NOT_FOUND, f"symbol {spec.symbol} not found in {path}")
        lib.bcc_procutils_free(sym.module)
        offset += sym.offset
    if spec.pid is not None and not os.path.exists(f"/proc/{spec.pid}"):
        raise TargetError(Reason.PROCESS_NOT_FOUND, f"process {spec.pid} does not exist")
    where = f"{binary}:{spec.symbol}" if spec.symbol else f"{binary}:{spec.offset:#x}"
    if spec.symbol and spec.offset:
        where += f"+{spec.offset:#x}"
    point = f"{spec.type}:{where}" + (f"[pid {spec.pid}]" if spec.pid is not None else "")
    st = os.stat(path)
    ident = {"path": path, "offset": offset, "inode": st.st_ino, "device": st.st_dev}
    return Target(f"{spec.name}@{point}", point, "perf", spec, {}, ident)


def _resolve_cgroup(spec: AttachSpec, env: Environment) -> Target:
    path = str(spec.cgroup_path)
    if not os.path.isabs(path):
        if env.cgroup2 is None:
            raise TargetError(Reason.UNSUPPORTED_ON_NODE, "no cgroup v2 filesystem is mounted")
        path = os.path.join(env.cgroup2, path)
    if not os.path.isdir(path) or fstype_of(path) != "cgroup2":
        raise TargetError(Reason.CGROUP_NOT_FOUND, f"{path} is not a cgroup v2 directory on this node")
    hook = spec.direction if spec.type == ProgramType.CGROUP_SKB else spec.attach_type
    point = f"{spec.type}/{hook}:{path}"
    ident = {"path": path, "cgroup_id": os.stat(path).st_ino}  # a cgroup v2 id is its inode number
    return Target(f"{spec.name}@{point}", point, "cgroup", spec, {}, ident)


def attach(target: Target, prog_fd: int, before_link_fd: int | None = None) -> bpf.OwnedFd:
    """Create the link for target; before_link_fd places a tcx link ahead of another one."""
    spec = target.spec
    try:
        if target.kind == "xdp":
            flags = bpf.XDP_FLAGS_SKB_MODE if target.params["mode"] == "generic" else bpf.XDP_FLAGS_DRV_MODE
            return bpf.link_create(prog_fd, target.ident["ifindex"], bpf.ATTACH_XDP, flags, target.point)
        if target.kind == "tcx":
            return bpf.tcx_link_create(prog_fd, target.ident["ifindex"], _TCX_ATTACH[spec.direction], before_link_fd)
        if target.kind == "cgroup":
            _, attach_type = program_type(spec)
            cgroup = os.open(target.ident["path"], os.O_RDONLY | os.O_DIRECTORY)
            try:
                return bpf.link_create(prog_fd, cgroup, int(attach_type or 0), 0, target.point)
            finally:
                os.close(cgroup)
        if target.kind == "raw_tp":
            return bpf.raw_tracepoint_open(str(spec.tracepoint), prog_fd)
        if target.kind == "tracing":
            return bpf.link_create(prog_fd, 0, _BTF_ATTACH[spec.type][1], 0, target.point)
        with _open_perf_event(target) as event:
            return bpf.link_create(prog_fd, event.fd, bpf.ATTACH_PERF_EVENT, 0, target.point)
    except bpf.BpfError as exc:
        raise _explain(target, exc) from None


def _open_perf_event(target: Target) -> bpf.OwnedFd:
    spec = target.spec
    if spec.type == ProgramType.TRACEPOINT:
        return bpf.perf_event_open(bpf.PERF_TYPE_TRACEPOINT, target.ident["id"])
    pmu = "uprobe" if spec.type in (ProgramType.UPROBE, ProgramType.URETPROBE) else "kprobe"
    ptype = pmu_type(pmu)
    if ptype is None:
        raise TargetError(Reason.UNSUPPORTED_ON_NODE, f"kernel built without {pmu}s")
    config = 1 << retprobe_bit(pmu) if spec.type in (ProgramType.URETPROBE, ProgramType.KRETPROBE) else 0
    if pmu == "uprobe":
        name = ct.create_string_buffer(target.ident["path"].encode())
        return bpf.perf_event_open(ptype, config, ct.addressof(name), target.ident["offset"], spec.pid or -1)
    name = ct.create_string_buffer(str(spec.symbol).encode())
    return bpf.perf_event_open(ptype, config, ct.addressof(name), spec.offset)


def _explain(target: Target, exc: bpf.BpfError) -> TargetError:
    """Attach errnos as the reasons and remedies a user can act on."""
    spec, err = target.spec, exc.errno
    if target.kind == "xdp" and err in (errno.EEXIST, errno.EBUSY):
        return TargetError(
            Reason.ATTACH_FAILED,
            f"{target.point}: the interface already has an XDP program (XDP takes one per interface); "
            "remove it, or chain programs with tc instead",
        )
    if target.kind == "xdp" and err == errno.EOPNOTSUPP:
        return TargetError(Reason.ATTACH_FAILED, f"{target.point}: the driver has no native XDP; use xdp mode generic")
    if target.kind in ("xdp", "tcx") and err == errno.ENODEV:
        return TargetError(Reason.INTERFACE_NOT_FOUND, f"{target.point}: the interface disappeared")
    if target.kind == "raw_tp" and err == errno.ENOENT:
        return TargetError(
            Reason.TRACEPOINT_NOT_FOUND, f"raw tracepoint {spec.tracepoint} does not exist on this kernel"
        )
    if target.kind == "perf" and err == errno.ESRCH:
        return TargetError(Reason.PROCESS_NOT_FOUND, f"{target.point}: process {spec.pid} does not exist")
    if spec.type in (ProgramType.KPROBE, ProgramType.KRETPROBE) and err in (errno.ENOENT, errno.EINVAL):
        return TargetError(
            Reason.SYMBOL_NOT_FOUND, f"{target.point}: kernel function {spec.symbol} is unknown or not traceable"
        )
    if spec.type == ProgramType.TRACEPOINT and err == errno.EACCES:
        return TargetError(Reason.ATTACH_FAILED, f"{target.point}: {_context_overrun(str(spec.tracepoint))}")
    return TargetError(Reason.ATTACH_FAILED, f"{target.point}: {os.strerror(err)}")


def _context_overrun(tracepoint: str) -> str:
    """Why the kernel refuses (EACCES) a verified tracepoint program: the verifier accepts
    any context offset up to a fixed maximum, and the attach checks it against this
    tracepoint's record, whose layout tracefs describes."""
    refusal = f"{os.strerror(errno.EACCES)}: the program reads past the end of its context"
    tracefs = find_mount("tracefs")
    if tracefs is None:
        return refusal
    fmt = os.path.join(tracefs, "events", *tracepoint.replace("/", ":").split(":"), "format")
    try:
        with open(fmt) as f:
            fields = re.findall(r"offset:(\d+);\s*size:(\d+);", f.read())
    except OSError:
        return refusal
    size = max((int(offset) + int(length) for offset, length in fields), default=0)
    return (
        f"{os.strerror(errno.EACCES)}: the program reads past the {size} bytes of its context "
        f"(this tracepoint's record; its fields are in {fmt})"
    )


def alive(target: Target, info: bpf.LinkInfo) -> bool:
    """Whether an existing link still hooks the object target resolves to now."""
    if target.kind in ("xdp", "tcx"):
        return info.ifindex != 0 and info.ifindex == target.ident["ifindex"]
    if target.kind == "cgroup":
        return info.cgroup_id != 0 and info.cgroup_id == target.ident["cgroup_id"]
    return True
