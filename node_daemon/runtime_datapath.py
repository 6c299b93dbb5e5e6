"""Load-or-adopt bpf/runtime_security.o through libbpf, attach its exec hook, keep its maps.

bpffs layout under the runtime directory:

    maps/rs_scopes|rs_files|rs_defaults|rs_counts|rs_events
    progs/<build>/<program>      build = hash of runtime_security.o
    link                         the attached hook (an LSM link or a perf-event link)

Everything is pinned, so a restarted daemon finds the hook attached and the maps full:
enforcement has no gap, and the daemon only diffs the maps against its spec. A new build
is attached before the old link is unpinned (both briefly decide; they agree or the newer
one is stricter). The hook is the strongest the node allows: the LSM program when BPF LSM
is active (listed in /sys/kernel/security/lsm) and the kernel loads it, else the
sched_process_exec tracepoint with SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import beekeeper.bpf
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.capabilities import fstype_of
from beekeeper.node_daemon.libbpf import BpfObject, ObjectLoadFailed, ObjectOpenFailed
from beekeeper.node_daemon.policy_syscalls import RingBufferReader, map_delete, map_update
from beekeeper.node_daemon.runtime_maps import COUNT_KEY, COUNT_VALUE, MAP_SPECS, SYNCED_MAPS

log = logging.getLogger(__name__)

OBJECT = "runtime_security.o"
LSM_PROGRAM = "rs_bprm_check"
TRACEPOINT_PROGRAM = "rs_exec"
TRACEPOINT = ("sched", "sched_process_exec")
ATTACH_LSM_MAC = 27
LSM_LIST = "/sys/kernel/security/lsm"
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


class RuntimeDatapathError(RuntimeError):
    """The datapath cannot run here; the message says why."""


def runtime_object() -> bytes:
    for directory in beekeeper.bpf.__path__:
        path = Path(directory) / OBJECT
        if path.is_file():
            return path.read_bytes()
    raise RuntimeDatapathError(
        f"{OBJECT} is missing from the beekeeper.bpf package: it is built from bpf/runtime_security.c by "
        "scripts/build_bpf.py (install.sh in a checkout, pip when it builds the wheel)"
    )


def bpf_lsm_active(path: str = LSM_LIST) -> tuple[bool, str]:
    """Whether BPF LSM programs would run: loading one succeeds on kernels where it never runs."""
    try:
        active = Path(path).read_text().strip().split(",")
    except OSError as exc:
        return False, f"{path} unreadable ({exc.strerror}): the active LSMs are unknown"
    if "bpf" not in active:
        return False, f"bpf is not an active LSM ({','.join(active)})"
    return True, ""


def _tracepoint_id() -> int:
    for root in TRACEFS:
        path = Path(root) / "events" / TRACEPOINT[0] / TRACEPOINT[1] / "id"
        if path.exists():
            return int(path.read_text())
    raise RuntimeDatapathError("tracefs is not mounted: the sched_process_exec tracepoint id is unknown")


class RuntimeDatapath:
    """The loaded (or adopted) hook and its maps, under one bpffs directory."""

    def __init__(self, bpffs_dir: Path, lsm_list: str = LSM_LIST) -> None:
        self.dir = Path(bpffs_dir)
        self._maps_dir = self.dir / "maps"
        self._link_pin = self.dir / "link"
        if fstype_of(str(self.dir.parent if not self.dir.exists() else self.dir)) != "bpf":
            raise RuntimeDatapathError(f"{self.dir} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")
        self._object = runtime_object()
        self.build_id = hashlib.sha256(self._object).hexdigest()[:12]
        self._maps_dir.mkdir(parents=True, exist_ok=True)
        self.hook_reason = ""
        """Why the LSM hook is not in force, when it is not."""
        self.hook = self._load_or_adopt(lsm_list)
        self._maps = {s.name: bpf.obj_get(str(self._maps_dir / s.name)) for s in MAP_SPECS}
        for spec in MAP_SPECS:
            info = bpf.map_info(self._maps[spec.name].fd)
            if (info.key_size, info.value_size, info.max_entries) != (spec.key_size, spec.value_size, spec.max_entries):
                raise RuntimeDatapathError(f"map {spec.name} has another layout: remove {self.dir} to recreate it")
        self._written: dict[str, dict[bytes, bytes]] | None = None

    # --- loading and attaching ----------------------------------------------------------

    def _load_or_adopt(self, lsm_list: str) -> str:
        progs_dir = self.dir / "progs" / self.build_id
        for program, hook in ((LSM_PROGRAM, "lsm"), (TRACEPOINT_PROGRAM, "tracepoint")):
            if self._link_pin.exists() and (progs_dir / program).exists():
                with bpf.obj_get(str(self._link_pin)) as link, bpf.obj_get(str(progs_dir / program)) as prog:
                    if bpf.link_info(link.fd).prog_id == bpf.prog_info(prog.fd).id:
                        log.info("adopted runtime-security hook %s build %s", hook, self.build_id)
                        return hook
        active, why = bpf_lsm_active(lsm_list)
        if active:
            try:
                self._attach(progs_dir, LSM_PROGRAM)
                return "lsm"
            except RuntimeDatapathError as exc:
                why = str(exc)
        self.hook_reason = why
        log.info("runtime security uses the tracepoint hook: %s", why)
        self._attach(progs_dir, TRACEPOINT_PROGRAM)
        return "tracepoint"

    def _attach(self, progs_dir: Path, program: str) -> None:
        try:
            with BpfObject.open(self._object, name="runtime_security") as obj:
                obj.load_only({program})
                for spec in MAP_SPECS:
                    obj.set_pin_path(spec.name, str(self._maps_dir / spec.name))
                obj.load()
                prog = obj.program_fd(program)
        except ObjectOpenFailed as exc:
            raise RuntimeDatapathError(f"{OBJECT} is unusable: {exc.message}") from None
        except ObjectLoadFailed as exc:
            raise RuntimeDatapathError(f"the kernel refused {program}: {exc.message}"[:1024]) from None
        with prog:
            try:
                if program == LSM_PROGRAM:
                    link = bpf.link_create(prog.fd, 0, ATTACH_LSM_MAC, what="attach lsm/bprm_check_security")
                else:
                    with bpf.perf_event_open(bpf.PERF_TYPE_TRACEPOINT, _tracepoint_id()) as event:
                        link = bpf.link_create(prog.fd, event.fd, bpf.ATTACH_PERF_EVENT, what="attach exec tracepoint")
            except bpf.BpfError as exc:
                raise RuntimeDatapathError(f"attaching {program}: {exc.strerror}") from None
            with link:
                progs_dir.mkdir(parents=True, exist_ok=True)
                (progs_dir / program).unlink(missing_ok=True)
                bpf.obj_pin(prog.fd, str(progs_dir / program))
                staged = self.dir / "link_new"  # bpffs refuses names with a dot
                staged.unlink(missing_ok=True)
                bpf.obj_pin(link.fd, str(staged))
                staged.replace(self._link_pin)  # the old link (if any) goes when its last pin does
        for old in (self.dir / "progs").iterdir():
            if old.name != self.build_id:
                shutil.rmtree(old)
        log.info("attached runtime-security hook %s build %s", program, self.build_id)

    # --- maps ---------------------------------------------------------------------------

    def sync(self, desired: Mapping[str, Mapping[bytes, bytes]]) -> int:
        """Make rs_scopes, rs_files and rs_defaults hold exactly `desired`; returns the writes made.

        Additions and changes go first, removals last: a container never passes through a
        state with fewer rules than both the old and the new spec give it.
        """
        current = self._written
        if current is None:
            spec = {s.name: s for s in MAP_SPECS}
            current = {
                name: dict(bpf.map_items(self._maps[name].fd, spec[name].key_size, spec[name].value_size))
                for name in SYNCED_MAPS
            }
        writes = 0
        self._written = None  # unknown until this sync completes
        for name in SYNCED_MAPS:  # files and defaults before the scopes that lead to them
            want, have = desired.get(name, {}), current.get(name, {})
            for key, value in want.items():
                if have.get(key) != value:
                    map_update(self._maps[name].fd, key, value)
                    writes += 1
        for name in reversed(SYNCED_MAPS):  # scopes first: no container meets half its rules
            want, have = desired.get(name, {}), current.get(name, {})
            for key in set(have) - set(want):
                map_delete(self._maps[name].fd, key)
                writes += 1
        self._written = {name: dict(desired.get(name, {})) for name in SYNCED_MAPS}
        return writes

    def counts(self) -> dict[int, int]:
        """Rule id -> execs matched (kept in the kernel across daemon restarts)."""
        items = bpf.map_items(self._maps["rs_counts"].fd, COUNT_KEY.size, COUNT_VALUE.size)
        return {COUNT_KEY.unpack(k)[0]: COUNT_VALUE.unpack(v)[0] for k, v in items}

    def events_reader(self, on_record: Callable[[bytes], None]) -> RingBufferReader:
        return RingBufferReader(self._maps["rs_events"].fd, on_record)

    @property
    def prog_id(self) -> int:
        with bpf.obj_get(str(self._link_pin)) as link:
            return bpf.link_info(link.fd).prog_id

    def close(self) -> None:
        for fd in self._maps.values():
            fd.close()
        self._maps = {}

    def remove(self) -> None:
        """Detach the hook and unpin everything (no valid policy left on the cluster)."""
        self.close()
        if self._link_pin.exists():
            try:
                with bpf.obj_get(str(self._link_pin)) as link:
                    bpf.link_detach(link.fd)
            except bpf.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        shutil.rmtree(self.dir, ignore_errors=True)
