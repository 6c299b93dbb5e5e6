"""From a pod's uid and a container's id to what the kernel sees of it, and paths to inodes.

The kubelet names a pod's cgroup after its uid and the runtime names the container's
after its id, under either driver:

    cgroupfs: kubepods[/burstable|/besteffort]/pod<uid>/<container id>
    systemd:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/
              cri-containerd-<container id>.scope (or crio-, docker-)

On a cgroup v2 node (or a v1 hybrid one whose unified hierarchy holds the containers, as
runc makes it) the container's cgroup id is the inode number of that directory in the
cgroup2 mount, which bpf_get_current_cgroup_id() returns for its processes; nested cgroups
below it are mapped too. Where the unified hierarchy has no such directory (pure v1), the
container is known by its mount namespace instead: the inode of /proc/<pid>/ns/mnt of a
process found through a v1 hierarchy (every container has a mount namespace of its own).

Paths are resolved inside the container's root with openat2(RESOLVE_IN_ROOT) on
/proc/<pid>/root, so an absolute symlink in the image resolves in the image, never on the
host, and the (device, inode) found is the file any name of it executes.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from beekeeper.node_daemon.runtime_maps import KEY_CGROUP, KEY_MNTNS, kernel_dev

_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
MAX_DEPTH = 7
"""Directory levels searched below a cgroup mount for pod cgroups (the systemd layout needs 3)."""

_libc = ct.CDLL(None, use_errno=True)


class _OpenHow(ct.Structure):
    _fields_ = (("flags", ct.c_uint64), ("mode", ct.c_uint64), ("resolve", ct.c_uint64))


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[list[Path], list[Path]]:
    """(cgroup2 mount points, cgroup v1 mount points) of this mount namespace."""
    v2: list[Path] = []
    v1: list[Path] = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split(" ", 1)[0]
            point = Path(left.split(" ")[4].replace("\\040", " "))
            if fstype == "cgroup2":
                v2.append(point)
            elif fstype == "cgroup":
                v1.append(point)
    return v2, v1


def _pod_dir_names(uid: str) -> set[str]:
    underscored = uid.replace("-", "_")
    return {f"pod{uid}", *(f"kubepods-{q}-pod{underscored}.slice" for q in ("burstable", "besteffort")),
            f"kubepods-pod{underscored}.slice"}  # fmt: skip


def _container_dir_match(name: str, container_id: str) -> bool:
    return name == container_id or (name.endswith(f"-{container_id}.scope"))


def find_pod_dirs(root: Path, uid: str, depth: int = MAX_DEPTH) -> list[Path]:
    """Directories named after the pod's uid below a cgroup mount (breadth-first, bounded)."""
    names = _pod_dir_names(uid)
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        nxt: list[Path] = []
        for directory in level:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.name in names:
                    found.append(Path(entry.path))
                else:
                    nxt.append(Path(entry.path))
        if found or not nxt:
            return found
        level = nxt
    return found


def container_dir(pod_dir: Path, container_id: str) -> Path | None:
    try:
        return next(
            (Path(e.path) for e in os.scandir(pod_dir) if e.is_dir() and _container_dir_match(e.name, container_id)),
            None,
        )
    except OSError:
        return None


def _walk(directory: Path) -> Iterator[Path]:
    yield directory
    try:
        children = [Path(e.path) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for child in children:
        yield from _walk(child)


def _pids(cgroup_dir: Path) -> list[int]:
    pids: list[int] = []
    for directory in _walk(cgroup_dir):
        try:
            pids += [int(line) for line in (directory / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


@dataclass
class ContainerIdentity:
    """What the kernel sees of one container: scope keys (kind, id) and a process for its root."""

    keys: list[tuple[int, int]] = field(default_factory=list)
    pid: int | None = None


def container_identity(
    uid: str, container_id: str, cgroup2: list[Path], cgroup1: list[Path], self_mntns: int
) -> ContainerIdentity | None:
    """The container's kernel identity, or None when no cgroup of it exists on this node (yet).

    PermissionError when its processes exist but none of their /proc entries may be read: the
    kernel checks ptrace access, which a daemon without CAP_SYS_PTRACE only has to processes
    whose capabilities are a subset of its own (a container's default set is not)."""
    cid = container_id.partition("://")[2] or container_id
    ident = ContainerIdentity()
    pids: list[int] = []
    for root in cgroup2:
        for pod_dir in find_pod_dirs(root, uid):
            found = container_dir(pod_dir, cid)
            if found is None:
                continue
            for directory in _walk(found):
                try:
                    ident.keys.append((KEY_CGROUP, os.stat(directory).st_ino))
                except OSError:
                    continue
            pids += _pids(found)
    if not pids:
        for root in cgroup1:
            for pod_dir in find_pod_dirs(root, uid):
                found = container_dir(pod_dir, cid)
                if found is not None:
                    pids += _pids(found)
            if pids:
                break
    denied: PermissionError | None = None
    for pid in pids:
        try:
            mntns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except PermissionError as exc:  # a ptrace-mode check: the container's process has capabilities we lack
            denied = exc
            continue
        except OSError:
            continue
        ident.pid = ident.pid or pid
        # A process still on its way into the container (or a simulated one) shares the daemon's
        # namespace: that one is the host's and is never a key.
        if mntns != self_mntns and (KEY_MNTNS, mntns) not in ident.keys:
            ident.keys.append((KEY_MNTNS, mntns))
    if ident.pid is None and denied is not None:
        raise denied
    if not ident.keys:
        return None
    return ident


def open_in_root(root: str, path: str, directory: bool = False) -> int:
    """An O_PATH fd of path resolved with root as "/" (absolute symlinks and .. stay inside)."""
    flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(flags=flags, mode=0, resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_OPENAT2, rootfd, os.fsencode(path), ct.byref(how), ct.sizeof(how))
        if fd < 0:
            err = ct.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd
    finally:
        os.close(rootfd)


def resolve(root: str, path: str, directory: bool) -> tuple[int, int] | None:
    """(kernel dev, inode) of a file (or, for prefixes, a directory) inside root; None when absent."""
    try:
        fd = open_in_root(root, path.rstrip("/") or "/", directory)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.EACCES):
            return None
        raise
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if directory != stat.S_ISDIR(st.st_mode):
        return None
    return kernel_dev(st.st_dev), st.st_ino
