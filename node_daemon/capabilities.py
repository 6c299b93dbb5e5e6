"""What this node's kernel can do, asked of the kernel itself, and the filesystems it needs.

Every verdict comes from the running kernel (a program load, an attach command on a
target that cannot exist, a PMU in sysfs), never from a version table: distribution
kernels backport features and build some out (this is how a kernel without kprobes shows
up as "UnsupportedOnNode" instead of a confusing attach error).
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
from pathlib import Path

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import xdp_dispatcher
from beekeeper.node_daemon.backend import HookSupport, NodeCapabilities, ProgramType
from beekeeper.node_daemon.libbpf import kernel_function_btf_id

log = logging.getLogger(__name__)

PMU_DIR = Path("/sys/bus/event_source/devices")
DEFAULT_BPFFS = "/sys/fs/bpf"
DEFAULT_TRACEFS = "/sys/kernel/tracing"

_libc = ct.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_ulong, ct.c_void_p]


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount visible to this process."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        out.append((mount_point, right.split()[0]))
    return out


def find_mount(fstype: str) -> str | None:
    return next((mp for mp, fs in mounts() if fs == fstype), None)


def fstype_of(path: str) -> str | None:
    """Filesystem type of the mount that holds path (which need not exist yet)."""
    path = os.path.abspath(path)
    best: tuple[str, str | None] = ("", None)
    for mp, fs in mounts():
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, fs)
    return best[1]


def _mount(fstype: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ct.get_errno()
        raise OSError(err, f"mount -t {fstype} {fstype} {target}: {os.strerror(err)}")
    log.info("mounted %s at %s", fstype, target)


def ensure_bpffs(path: str) -> None:
    """Make sure path lies on a bpf filesystem, mounting /sys/fs/bpf if nothing is there."""
    if fstype_of(path) == "bpf":
        return
    if find_mount("bpf") is None and path.startswith(DEFAULT_BPFFS):
        _mount("bpf", DEFAULT_BPFFS)
    if fstype_of(path) != "bpf":
        raise RuntimeError(
            f"{path} is not on a bpf filesystem, so pins there would not hold BPF objects; "
            f"use a base directory under a bpffs mount (mount -t bpf bpf {DEFAULT_BPFFS})"
        )


def ensure_tracefs() -> str | None:
    """The tracefs mount point (mounting it at /sys/kernel/tracing if needed), or None."""
    found = find_mount("tracefs")
    if found:
        return found
    try:
        _mount("tracefs", DEFAULT_TRACEFS)
    except OSError as exc:
        log.warning("no tracefs and cannot mount one (%s): tracepoints are unavailable", exc)
        return None
    return DEFAULT_TRACEFS


def pmu_type(name: str) -> int | None:
    """perf_event_open type of a dynamic PMU ("kprobe", "uprobe"), None if the kernel lacks it."""
    try:
        return int((PMU_DIR / name / "type").read_text())
    except (OSError, ValueError):
        return None


def retprobe_bit(name: str) -> int:
    """Bit of perf_event_attr.config that turns a k/uprobe into a return probe ("config:0")."""
    return int((PMU_DIR / name / "format" / "retprobe").read_text().strip().split(":")[1])


def _tcx_supported() -> bool:
    """tcx (Linux 6.6) answers ENODEV for ifindex 0; older kernels do not know the attach type."""
    with bpf.load_trivial_prog(bpf.PROG_TYPE_SCHED_CLS) as prog:
        try:
            bpf.tcx_link_create(prog.fd, 0, bpf.ATTACH_TCX_INGRESS).close()
        except bpf.BpfError as exc:
            return exc.errno == errno.ENODEV
    return True


def _perf_link_supported() -> bool:
    """Perf-event links (Linux 5.15) answer EBADF for a non-perf fd; older kernels EINVAL."""
    with bpf.load_trivial_prog(bpf.PROG_TYPE_TRACEPOINT) as prog:
        try:
            bpf.link_create(prog.fd, prog.fd, bpf.ATTACH_PERF_EVENT).close()
        except bpf.BpfError as exc:
            return exc.errno == errno.EBADF
    return True


_BTF_PROBES = {
    ProgramType.FENTRY: (bpf.PROG_TYPE_TRACING, bpf.ATTACH_TRACE_FENTRY, "bpf_fentry_test1"),
    ProgramType.FEXIT: (bpf.PROG_TYPE_TRACING, bpf.ATTACH_TRACE_FEXIT, "bpf_fentry_test1"),
    ProgramType.LSM: (bpf.PROG_TYPE_LSM, bpf.ATTACH_LSM_MAC, "bpf_lsm_file_open"),
}
"""Per BTF-attached type: the program load that proves it works (the kernel's own test targets)."""


def _probe_btf_attached(program_type: ProgramType) -> HookSupport:
    """Load a trivial program of the type at a function every such kernel has; the kernel's
    answer is the verdict (some kernels refuse these types even to root, e.g. with EPERM from
    a lockdown or an LSM policy, whatever their config says)."""
    ptype, attach, function = _BTF_PROBES[program_type]
    try:
        btf_id = kernel_function_btf_id(function)
        bpf.load_trivial_prog(ptype, attach, btf_id).close()
    except bpf.BpfError as exc:
        return HookSupport(
            False,
            f"the kernel refused a minimal {program_type} program (attached to {function}): "
            f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})",
        )
    return HookSupport(True)


def _probe_pmu(name: str, tracefs: str | None) -> HookSupport:
    if pmu_type(name) is not None:
        return HookSupport(True)
    if tracefs and os.path.exists(os.path.join(tracefs, f"{name}_events")):
        return HookSupport(False, f"kernel has {name}_events but no {name} PMU; beekeeper needs Linux >= 4.17")
    return HookSupport(
        False,
        f"kernel built without {name}s: no {PMU_DIR}/{name} and no {name}_events in tracefs",
    )


def _probe_xdp_multi_program(cache_dir: Path) -> HookSupport:
    kernel = xdp_dispatcher.probe(cache_dir)
    if not kernel.supported:
        return kernel
    return HookSupport(
        False,
        "the kernel takes freplace extension programs, but beekeeper cannot load its bcc-built programs as "
        "extensions yet (bcc's loader takes no freplace target), so an interface runs one XDP program",
    )


def probe(tracefs: str | None, cgroup2: str | None, xdp_cache: Path | None = None) -> NodeCapabilities:
    """Probe every hook beekeeper knows; cheap (a handful of tiny program loads). xdp_cache
    holds the compiled XDP dispatcher the multi-program probe loads (no probe without it)."""

    def prog_type(ptype: int, label: str) -> HookSupport:
        if bpf.prog_type_supported(ptype):
            return HookSupport(True)
        return HookSupport(False, f"kernel cannot load {label} programs")

    def all_of(*checks: HookSupport) -> HookSupport:
        return next((c for c in checks if not c.supported), HookSupport(True))

    no_perf_link = HookSupport(
        False, "kernel lacks BPF perf-event links (Linux >= 5.15), so attachments could not be pinned"
    )
    perf_link = HookSupport(True) if _perf_link_supported() else no_perf_link
    cgroup = HookSupport(True) if cgroup2 else HookSupport(False, "no cgroup v2 filesystem is mounted")
    kprobe_prog = prog_type(bpf.PROG_TYPE_KPROBE, "kprobe")
    kprobe = all_of(kprobe_prog, perf_link, _probe_pmu("kprobe", tracefs))
    uprobe = all_of(kprobe_prog, perf_link, _probe_pmu("uprobe", tracefs))
    sched_cls = prog_type(bpf.PROG_TYPE_SCHED_CLS, "tc (sched_cls)")
    tcx = (
        HookSupport(True)
        if sched_cls.supported and _tcx_supported()
        else HookSupport(False, "kernel lacks tcx links (Linux >= 6.6)")
    )
    tracepoints = HookSupport(True) if tracefs else HookSupport(False, "tracefs is not mounted and cannot be")
    hooks = {
        ProgramType.XDP: prog_type(bpf.PROG_TYPE_XDP, "XDP"),
        ProgramType.TC: all_of(sched_cls, tcx),
        ProgramType.TRACEPOINT: all_of(prog_type(bpf.PROG_TYPE_TRACEPOINT, "tracepoint"), perf_link, tracepoints),
        ProgramType.RAW_TRACEPOINT: prog_type(bpf.PROG_TYPE_RAW_TRACEPOINT, "raw tracepoint"),
        ProgramType.UPROBE: uprobe,
        ProgramType.URETPROBE: uprobe,
        ProgramType.KPROBE: kprobe,
        ProgramType.KRETPROBE: kprobe,
        ProgramType.CGROUP_SKB: all_of(prog_type(bpf.PROG_TYPE_CGROUP_SKB, "cgroup_skb"), cgroup),
        ProgramType.CGROUP_SOCK_ADDR: all_of(prog_type(bpf.PROG_TYPE_CGROUP_SOCK_ADDR, "cgroup_sock_addr"), cgroup),
        **{t: _probe_btf_attached(t) for t in _BTF_PROBES},
    }
    caps = NodeCapabilities(
        kernel_release=os.uname().release,
        btf=os.path.exists("/sys/kernel/btf/vmlinux"),
        hooks={str(k): v for k, v in hooks.items()},
        xdp_multi_program=_probe_xdp_multi_program(xdp_cache) if xdp_cache else HookSupport(False, "not probed"),
    )
    unsupported = {k: v.reason for k, v in caps.hooks.items() if not v.supported}
    log.info(
        "kernel %s capabilities probed; unsupported hooks: %s; multi-program XDP: %s",
        caps.kernel_release,
        unsupported or "none",
        "yes" if caps.xdp_multi_program.supported else caps.xdp_multi_program.reason,
    )
    return caps
