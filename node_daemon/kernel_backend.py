"""The real kernel backend: bcc compiles (or libbpf relocates a CO-RE object), the kernel
verifies, pinned BPF links attach.

Everything the daemon puts in the kernel is pinned under its base directory (see
unit_state for the layout) and described in its state directory, so the process holds no
kernel object between calls: killing it (even with SIGKILL) changes nothing in the
datapath, and a new instance adopts the pins without reloading anything.

Converging a unit:
1. Build: compile the source (or open the object) once per content hash in a compile
   worker (a child process with time and memory limits and a sandbox: see compile_worker),
   which loads every program and map and hands their fds over; pin them. Both code sources
   give the same pins, so everything after this step does not know which one built. A build that failed for good
   (compile or verifier error, compiler crash or timeout) is remembered, not retried, and
   one that ended the daemon twice in a row is quarantined (build_guard).
2. Attach: resolve every spec to targets now (interfaces, cgroups, tracepoints) and make
   one pinned link per target: create it, keep it, swap its program in place
   (BPF_LINK_UPDATE) or, for hooks that cannot swap, attach the new link before dropping
   the old. A program whose new build failed keeps its previous build attached.
3. Collect: drop links no spec wants, builds no link uses, and any pin not described.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import hooks, xdp_dispatcher
from beekeeper.node_daemon.backend import (
    MESSAGE_LIMIT,
    AttachSpec,
    Backend,
    Layout,
    MapEntry,
    MapNotFound,
    NodeCapabilities,
    Phase,
    ProgramReport,
    ProgramStats,
    ProgramUnit,
    Reason,
    UnitNotFound,
)
from beekeeper.node_daemon.build_guard import QUARANTINE_AFTER, BuildGuard
from beekeeper.node_daemon.capabilities import ensure_bpffs, ensure_tracefs, find_mount, probe
from beekeeper.node_daemon.compile_errors import CompileFailed, bound_head
from beekeeper.node_daemon.compile_limits import CompileLimits
from beekeeper.node_daemon.compile_worker import CompileWorkers, Load, sandbox_paths
from beekeeper.node_daemon.hooks import Environment, Target, TargetError
from beekeeper.node_daemon.map_codec import default_layout, value_ints
from beekeeper.node_daemon.unit_state import (
    LINKS_DIR,
    BuildRecord,
    Failure,
    LinkRecord,
    ProgramRecord,
    StateStore,
    UnitRecord,
    safe_name,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_DIR = "/sys/fs/bpf/beekeeper"
DEFAULT_STATE_DIR = "/var/lib/beekeeper"


@dataclasses.dataclass(frozen=True)
class _View:
    """Pins of one unit as of its last apply, readable without the apply lock (a metrics
    scrape must not wait for a compile)."""

    maps: dict[str, Path]
    programs: tuple[tuple[str, str, Path], ...]
    """(function, type, pin) of every program still pinned."""


class KernelBackend(Backend):
    """Backend for the running kernel. base_dir (on bpffs) and state_dir belong to this
    backend alone (a lock on state_dir waits up to lock_timeout seconds for a previous
    holder): give each node daemon on a machine its own pair. compile_limits bound every
    build of user code."""

    def __init__(
        self,
        base_dir: str = DEFAULT_BASE_DIR,
        state_dir: str = DEFAULT_STATE_DIR,
        *,
        collect_run_stats: bool = False,
        lock_timeout: float = 60.0,
        compile_limits: CompileLimits | None = None,
    ) -> None:
        ensure_bpffs(base_dir)
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._store = StateStore(state_dir, lock_timeout)
        self._xdp_cache = Path(state_dir) / "xdp-dispatcher"
        self._env = Environment(tracefs=ensure_tracefs(), cgroup2=find_mount("cgroup2"))
        self._guard = BuildGuard(state_dir)
        self._workers = CompileWorkers(compile_limits or CompileLimits(), sandbox_paths(self._env.tracefs))
        self._lock = threading.RLock()
        self._caps: NodeCapabilities | None = None
        self._stats_fd = _run_time_stats() if collect_run_stats else None
        self._units: dict[str, UnitRecord] = {}
        self._views: dict[str, _View] = {}
        self._adopt()

    def close(self) -> None:
        """Release this process's handles and the state lock; the kernel objects stay pinned."""
        if self._stats_fd is not None:
            self._stats_fd.close()
        self._workers.close()
        self._store.close()

    # --- Backend -----------------------------------------------------------------------

    def capabilities(self) -> NodeCapabilities:
        with self._lock:
            if self._caps is None:
                self._caps = probe(self._env.tracefs, self._env.cgroup2, self._xdp_cache)
            return self._caps

    def adopted(self) -> dict[str, str]:
        with self._lock:
            return {key: rec.content_hash for key, rec in self._units.items()}

    def apply(self, unit: ProgramUnit) -> list[ProgramReport]:
        with self._lock:
            rec = self._units.get(unit.key)
            if rec is None:
                rec = self._units[unit.key] = UnitRecord(unit.key, safe_name(unit.key))
            try:
                reports = self._converge(rec, unit)
            finally:
                self._collect(rec)
        failed = [r.name for r in reports if r.phase == Phase.FAILED]
        log.info("unit %s applied: %d programs, failed: %s", unit.key, len(reports), failed or "none")
        return reports

    def remove(self, key: str) -> None:
        with self._lock:
            rec = self._units.pop(key, None)
            if rec is None:
                return
            self._views.pop(key, None)
            self._prune(rec, wanted=set())
            self._store.delete(rec)
            self._guard.end(rec.dirname)
        log.info("unit %s removed: links detached, pins deleted", key)

    def read_map(self, key: str, map_name: str, key_layout: Layout | None = None) -> list[MapEntry]:
        with self._open_map(key, map_name) as fd:
            info = bpf.map_info(fd.fd)
            cpus = bpf.possible_cpus() if info.type in bpf.PERCPU_MAP_TYPES else 0
            value_size = -(-info.value_size // 8) * 8 * cpus if cpus else info.value_size
            layout = key_layout or default_layout(info.key_size)
            array = info.type in bpf.ARRAY_MAP_TYPES
            return [
                MapEntry(layout.decode(k), value_ints(v, info.value_size, cpus), k, array)
                for k, v in bpf.map_items(fd.fd, info.key_size, value_size)
            ]

    def program_stats(self, key: str) -> list[ProgramStats]:
        stats = []
        for function, ptype, path in self._view(key).programs:
            try:
                with bpf.obj_get(str(path)) as fd:
                    info = bpf.prog_info(fd.fd)
            except bpf.BpfError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # replaced by an update since the view was published
                raise
            stats.append(ProgramStats(function, ptype, info.id, info.run_cnt, info.run_time_ns))
        return stats

    def _view(self, key: str) -> _View:
        view = self._views.get(key)
        if view is None:
            raise UnitNotFound(f"no unit {key!r} on this node")
        return view

    def _open_map(self, key: str, map_name: str) -> bpf.OwnedFd:
        """Open a map pin of the published view; if an update unpinned it meanwhile, the
        next view has its successor."""
        for attempt in range(2):
            view = self._view(key)
            path = view.maps.get(map_name)
            if path is None:
                names = ", ".join(sorted(view.maps)) or "none"
                raise MapNotFound(f"unit {key} has no map {map_name!r} (it has: {names})")
            try:
                return bpf.obj_get(str(path))
            except bpf.BpfError as exc:
                if exc.errno != errno.ENOENT or attempt:
                    raise
        raise AssertionError("unreachable")

    # --- converge ----------------------------------------------------------------------

    def _converge(self, rec: UnitRecord, unit: ProgramUnit) -> list[ProgramReport]:
        caps = self.capabilities()
        blocked: dict[int, Failure] = {}
        for i, spec in enumerate(unit.programs):
            problem = spec.problem()
            support = caps.support(spec.type)
            if problem:
                blocked[i] = Failure(Reason.INVALID_SPEC, problem)
            elif not support.supported:
                blocked[i] = Failure(
                    Reason.UNSUPPORTED_ON_NODE, f"{spec.type} is unsupported on this node: {support.reason}"
                )
        loads = {s.load_key: s for i, s in enumerate(unit.programs) if i not in blocked}
        build = self._ensure_build(rec, unit, loads)

        desired: set[str] = set()
        reports = []
        for i, spec in enumerate(unit.programs):
            if i in blocked:
                reports.append(
                    ProgramReport(
                        spec.name, spec.type, Phase.FAILED, reason=blocked[i].reason, message=blocked[i].message
                    )
                )
                continue
            reports.append(self._converge_spec(rec, build, spec, desired))
        for slot in set(rec.links) - desired:
            self._drop_link(rec, slot)
        return reports

    def _ensure_build(self, rec: UnitRecord, unit: ProgramUnit, loads: dict[str, AttachSpec]) -> BuildRecord:
        """A build of the unit's content: the current one, a still-pinned earlier one (a
        rollback reuses its programs as they are), or a fresh compile."""
        for build in sorted(rec.builds.values(), key=lambda b: b.build_id != rec.current):
            covered = build.compile_failure or loads.keys() <= (build.programs.keys() | build.failures.keys())
            if build.content_hash == unit.content_hash and build.final and covered and self._intact(rec, build):
                rec.current, rec.content_hash = build.build_id, unit.content_hash
                return build

        build = BuildRecord(f"{unit.content_hash[:12]}-{rec.next_seq}", unit.content_hash)
        rec.next_seq += 1
        rec.builds[build.build_id] = build
        rec.current, rec.content_hash = build.build_id, unit.content_hash
        self._store.save(rec)  # from here on, a crash leaves pins the next adoption can attribute
        ended = self._guard.begin(rec.dirname, rec.key, unit.content_hash)
        if ended >= QUARANTINE_AFTER:
            message = (
                f"quarantined: the node daemon ended {ended} times in a row while building this program "
                f"(content hash {unit.content_hash[:12]}); it is not built again until its source, flags "
                "or programs change"
            )
            build.compile_failure = Failure(Reason.QUARANTINED, message)
            log.error("unit %s: %s", rec.key, message)
            return build
        try:
            self._build(rec, build, unit, loads)
        finally:
            self._guard.end(rec.dirname)
        return build

    def _build(self, rec: UnitRecord, build: BuildRecord, unit: ProgramUnit, loads: dict[str, AttachSpec]) -> None:
        """Compile and load in a worker, then pin what it handed over."""
        started = time.monotonic()
        jobs = [Load(key, spec.name, *hooks.program_type(spec), spec.btf_target) for key, spec in loads.items()]
        try:
            if unit.bytecode is not None:
                built = self._workers.load_object(unit.bytecode, dict(unit.global_data), jobs)
            else:
                built = self._workers.build(unit.source or "", unit.cflags, jobs)
        except CompileFailed as exc:
            build.compile_failure = Failure(exc.reason, exc.message)
            log.warning("unit %s build %s failed (%s):\n%s", rec.key, build.build_id, exc.reason, exc.message)
            return
        unit_dir = self._unit_dir(rec)
        try:
            with built:
                for sub in ("maps", "progs"):
                    (unit_dir / build.build_id / sub).mkdir(parents=True, exist_ok=True)
                for name, fd in built.maps.items():
                    build.maps[name] = f"{build.build_id}/maps/{safe_name(name)}"
                    bpf.obj_pin(fd.fd, str(unit_dir / build.maps[name]))
                for load_key, prog in built.programs.items():
                    spec = loads[load_key]
                    pin = f"{build.build_id}/progs/{safe_name(load_key)}"
                    bpf.obj_pin(prog.fd, str(unit_dir / pin))
                    build.programs[load_key] = ProgramRecord(spec.name, spec.type, pin, bpf.prog_info(prog.fd).id)
                for load_key, failed in built.failures.items():
                    build.failures[load_key] = Failure(failed.reason, failed.message, failed.transient)
                    log.warning("unit %s: %s not loaded (%s)", rec.key, loads[load_key].name, failed.reason)
        except OSError as exc:
            build.compile_failure = Failure(
                Reason.LOAD_FAILED, f"pinning under {unit_dir} failed: {exc}", transient=True
            )
            log.error("unit %s build %s: %s", rec.key, build.build_id, build.compile_failure.message)
        log.info(
            "unit %s build %s: %d programs loaded, %d failed, in %.2fs",
            rec.key,
            build.build_id,
            len(build.programs),
            len(build.failures),
            time.monotonic() - started,
        )

    def _converge_spec(self, rec: UnitRecord, build: BuildRecord, spec: AttachSpec, desired: set[str]) -> ProgramReport:
        failure = build.compile_failure or build.failures.get(spec.load_key)
        prog = build.programs.get(spec.load_key)
        res = hooks.resolve(spec, self._env)
        errors = list(res.errors)
        points: list[str] = []
        ids: set[int] = {prog.prog_id} if prog else set()
        kept = 0
        for target in res.targets:
            desired.add(target.slot)
            try:
                self._converge_link(rec, build, prog, target)
            except TargetError as exc:
                errors.append(exc)
            except OSError as exc:  # a pin vanished under us, bpffs full, ...: retried on the next apply
                log.warning("unit %s: %s: %s", rec.key, target.point, exc)
                errors.append(TargetError(Reason.ATTACH_FAILED, f"{target.point}: {exc}"))
            link = rec.links.get(target.slot)  # what is attached now, whatever happened
            if link is not None:
                points.append(link.point)
                ids.add(link.prog_id)
                kept += link.build_id != build.build_id
        common: dict[str, Any] = {
            "name": spec.name,
            "type": spec.type,
            "program_ids": tuple(sorted(ids)),
            "attach_points": tuple(points),
        }
        if failure:
            note = f"previous build stays attached at {kept} point(s); " if kept else ""
            return ProgramReport(
                **common,
                phase=Phase.FAILED,
                reason=failure.reason,
                message=bound_head(note + failure.message, MESSAGE_LIMIT),
            )
        if errors:
            message = bound_head("\n".join(e.message for e in errors), MESSAGE_LIMIT)
            return ProgramReport(**common, phase=Phase.FAILED, reason=errors[0].reason, message=message)
        if not points:
            reason = Reason.NO_MATCHING_INTERFACES if res.no_match else ""
            return ProgramReport(**common, phase=Phase.LOADED, reason=reason, message=res.no_match or "")
        return ProgramReport(**common, phase=Phase.ATTACHED)

    def _converge_link(self, rec: UnitRecord, build: BuildRecord, prog: ProgramRecord | None, target: Target) -> None:
        """Make target's link run prog (or keep its old program when prog is None)."""
        existing = rec.links.get(target.slot)
        old_fd = None
        if existing is not None:
            try:
                old_fd = bpf.obj_get(str(self._unit_dir(rec) / existing.pin))
                info = bpf.link_info(old_fd.fd)
            except OSError:
                info = None
            if info is None or not hooks.alive(target, info) or existing.ident != target.ident:
                if old_fd is not None:
                    old_fd.close()
                log.info("unit %s: link %s is stale (target gone or re-created); re-attaching", rec.key, target.point)
                self._drop_link(rec, target.slot)
                existing, old_fd = None, None
            else:
                existing.prog_id = info.prog_id
        with old_fd or nullcontext():
            if prog is None or (
                existing is not None and existing.prog_id == prog.prog_id and existing.params == target.params
            ):
                return
            if existing is None:
                self._attach(rec, build, prog, target, replacing=None)
            elif existing.params == target.params and target.kind in hooks.UPDATABLE_KINDS:
                assert old_fd is not None  # opened above whenever `existing` survived
                with bpf.obj_get(str(self._unit_dir(rec) / prog.pin)) as new_prog:
                    try:
                        bpf.link_update(old_fd.fd, new_prog.fd)
                    except bpf.BpfError as exc:
                        raise TargetError(
                            Reason.ATTACH_FAILED, f"{target.point}: swapping the program failed: {exc.strerror}"
                        ) from None
                existing.prog_id, existing.build_id, existing.load_key = (
                    prog.prog_id,
                    build.build_id,
                    target.spec.load_key,
                )
                log.info("unit %s: %s now runs build %s (atomic link update)", rec.key, target.point, build.build_id)
            elif target.kind in hooks.EXCLUSIVE_KINDS or existing.prog_id == prog.prog_id:
                self._reattach_exclusive(rec, build, prog, target, existing)
            else:
                self._attach(rec, build, prog, target, replacing=existing)

    def _reattach_exclusive(
        self, rec: UnitRecord, build: BuildRecord, prog: ProgramRecord, target: Target, existing: LinkRecord
    ) -> None:
        """Change the attach options of a link whose successor cannot coexist with it: xdp
        holds one program per interface (generic -> native), and a tcx hook holds a program
        once (a new priority moves the same program): the old link must go first, so this
        program has a short gap (the others on the hook have none); if the new options do
        not work on this node, the old attachment is restored and the error reported."""
        self._drop_link(rec, target.slot)
        try:
            self._attach(rec, build, prog, target, replacing=None)
        except TargetError as exc:
            old_build = rec.builds.get(existing.build_id)
            old_prog = (
                next((p for p in old_build.programs.values() if p.prog_id == existing.prog_id), None)
                if old_build
                else None
            )
            if old_build is None or old_prog is None:
                raise
            old = dataclasses.replace(target, point=existing.point, params=existing.params)
            try:
                self._attach(rec, old_build, old_prog, old, replacing=None)
            except TargetError as restore:
                raise TargetError(
                    exc.reason, f"{exc.message}; restoring {existing.point} failed too: {restore}"
                ) from None
            raise TargetError(exc.reason, f"{exc.message}; kept {existing.point}") from None

    def _attach(
        self, rec: UnitRecord, build: BuildRecord, prog: ProgramRecord, target: Target, replacing: LinkRecord | None
    ) -> None:
        """Create and pin a link; a replaced link is dropped only once the new one is live."""
        unit_dir = self._unit_dir(rec)
        pin = replacing.pin if replacing else f"{LINKS_DIR}/{safe_name(target.slot)}"
        if target.kind == "xdp" and replacing is None:
            self._check_xdp_free(target)
        anchor = self._tcx_anchor(rec, target) if target.kind == "tcx" else None
        with bpf.obj_get(str(unit_dir / prog.pin)) as prog_fd, anchor or nullcontext():
            link = hooks.attach(target, prog_fd.fd, anchor.fd if anchor else None)
        with link:
            path = unit_dir / pin
            path.parent.mkdir(exist_ok=True)
            if replacing:
                staged = path.with_name(path.name + "~staged")
                bpf.obj_pin(link.fd, str(staged))
                os.replace(staged, path)  # the old link loses its pin only now: no gap
            else:
                bpf.obj_pin(link.fd, str(path))
        rec.links[target.slot] = LinkRecord(
            target.slot,
            target.point,
            target.kind,
            target.spec.load_key,
            build.build_id,
            prog.prog_id,
            pin,
            target.params,
            target.ident,
        )
        log.info(
            "unit %s: attached %s (build %s)%s",
            rec.key,
            target.point,
            build.build_id,
            " replacing the old link" if replacing else "",
        )

    def _check_xdp_free(self, target: Target) -> None:
        """A second XDP program on an interface is UnsupportedOnNode, naming the holder, on a
        node without multi-program XDP (the holder keeps running as it is)."""
        ifindex = target.ident["ifindex"]
        occupant = xdp_dispatcher.inspect(ifindex)
        if occupant is None:
            return
        owner = next(
            (
                other.key
                for other in self._units.values()
                for link in other.links.values()
                if link.kind == "xdp" and link.ident.get("ifindex") == ifindex
            ),
            None,
        )
        message = xdp_dispatcher.refusal(target.point, occupant, owner, self.capabilities().xdp_multi_program)
        raise TargetError(Reason.UNSUPPORTED_ON_NODE, message)

    def _tcx_anchor(self, rec: UnitRecord, target: Target) -> bpf.OwnedFd | None:
        """The link of the lowest-priority-number beekeeper program that must run after target."""
        best: tuple[int, UnitRecord, LinkRecord] | None = None
        for other in self._units.values():
            for link in other.links.values():
                if link.kind != "tcx" or (other is rec and link.slot == target.slot):
                    continue
                if link.ident != target.ident or link.params.get("direction") != target.params["direction"]:
                    continue
                prio = link.params["priority"]
                if prio > target.params["priority"] and (best is None or prio < best[0]):
                    best = (prio, other, link)
        if best is None:
            return None
        try:
            return bpf.obj_get(str(self._unit_dir(best[1]) / best[2].pin))
        except OSError:
            return None

    # --- collect and adopt -------------------------------------------------------------

    def _drop_link(self, rec: UnitRecord, slot: str) -> None:
        link = rec.links.pop(slot)
        _unpin_link(self._unit_dir(rec) / link.pin)
        log.info("unit %s: detached %s", rec.key, link.point)

    def _collect(self, rec: UnitRecord) -> None:
        """Forget builds no link runs (except the current one), delete undescribed pins, save,
        and publish the unit's maps and programs for readers."""
        used = {link.build_id for link in rec.links.values()} | {rec.current}
        for build_id in set(rec.builds) - used:
            del rec.builds[build_id]
        self._prune(rec, self._pins(rec))
        self._store.save(rec)
        unit_dir = self._unit_dir(rec)
        maps: dict[str, Path] = {}
        for build in sorted(rec.builds.values(), key=lambda b: (b.build_id == rec.current, _seq(b))):
            maps |= {name: unit_dir / pin for name, pin in build.maps.items()}  # the current build wins
        programs = tuple(
            (p.function, p.type, unit_dir / p.pin) for b in rec.builds.values() for p in b.programs.values()
        )
        self._views[rec.key] = _View(maps, programs)

    @staticmethod
    def _pins(rec: UnitRecord) -> set[str]:
        pins = {link.pin for link in rec.links.values()}
        for build in rec.builds.values():
            pins |= {p.pin for p in build.programs.values()} | set(build.maps.values())
        return pins

    def _prune(self, rec: UnitRecord, wanted: set[str]) -> None:
        """Delete every pin under the unit's directory that is not wanted (links detached
        first); with nothing wanted, the directory itself goes too."""
        unit_dir = self._unit_dir(rec)
        for root, dirs, files in os.walk(unit_dir, topdown=False):
            for name in files:
                path = Path(root) / name
                rel = str(path.relative_to(unit_dir))
                if rel in wanted:
                    continue
                if rel.startswith(LINKS_DIR + "/"):
                    _unpin_link(path)
                else:
                    path.unlink()
                log.debug("unit %s: unpinned %s", rec.key, rel)
            for name in dirs:
                path = Path(root) / name
                if not any(path.iterdir()):
                    path.rmdir()
        if not wanted and unit_dir.is_dir():
            unit_dir.rmdir()

    def _adopt(self) -> None:
        """Take over what an earlier instance pinned: verify, refresh ids, prune the rest."""
        for rec in self._store.load_all():
            if not self._unit_dir(rec).is_dir():
                self._store.delete(rec)  # pins gone (e.g. node rebooted): nothing to adopt
                continue
            self._verify(rec)
            self._units[rec.key] = rec
            self._collect(rec)
            log.info(
                "adopted unit %s: build %s, %d links, program ids %s",
                rec.key,
                rec.current,
                len(rec.links),
                sorted(link.prog_id for link in rec.links.values()),
            )
        known = {rec.dirname for rec in self._units.values()}
        for entry in self.base_dir.iterdir():
            if entry.name not in known:
                log.warning("removing pins of %s: no unit state describes them", entry)
                if entry.is_dir():
                    self._prune(UnitRecord(key=entry.name, dirname=entry.name), wanted=set())
                else:
                    entry.unlink()

    def _verify(self, rec: UnitRecord) -> None:
        """Drop what lost its pin; trust the kernel for which program each link runs."""
        unit_dir = self._unit_dir(rec)
        owners: dict[int, tuple[str, str]] = {}
        for build in rec.builds.values():
            lost = [k for k, p in build.programs.items() if not (unit_dir / p.pin).exists()]
            lost += [k for k, pin in build.maps.items() if not (unit_dir / pin).exists()]
            for load_key, prog in list(build.programs.items()):
                try:
                    with bpf.obj_get(str(unit_dir / prog.pin)) as fd:
                        prog.prog_id = bpf.prog_info(fd.fd).id
                    owners[prog.prog_id] = (build.build_id, load_key)
                except OSError:
                    del build.programs[load_key]
            build.maps = {name: pin for name, pin in build.maps.items() if (unit_dir / pin).exists()}
            if lost:  # someone deleted pins: the next apply rebuilds instead of trusting this build
                log.warning("unit %s build %s lost pins %s", rec.key, build.build_id, lost)
                build.compile_failure = Failure(Reason.LOAD_FAILED, "pins of this build disappeared", transient=True)
        for slot, link in list(rec.links.items()):
            try:
                with bpf.obj_get(str(unit_dir / link.pin)) as fd:
                    link.prog_id = bpf.link_info(fd.fd).prog_id
            except OSError:
                del rec.links[slot]
                continue
            if link.prog_id in owners:
                link.build_id, link.load_key = owners[link.prog_id]

    def _unit_dir(self, rec: UnitRecord) -> Path:
        return self.base_dir / rec.dirname

    def _intact(self, rec: UnitRecord, build: BuildRecord) -> bool:
        unit_dir = self._unit_dir(rec)
        pins = [p.pin for p in build.programs.values()] + list(build.maps.values())
        return all((unit_dir / pin).exists() for pin in pins)


def _seq(build: BuildRecord) -> int:
    return int(build.build_id.rsplit("-", 1)[1])


def _unpin_link(path: Path) -> None:
    """Detach the link (even if someone else holds it open), then delete its pin."""
    try:
        with bpf.obj_get(str(path)) as fd:
            bpf.link_detach(fd.fd)
    except bpf.BpfError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
            log.warning("detaching %s: %s", path, exc)
    path.unlink(missing_ok=True)


def _run_time_stats() -> bpf.OwnedFd | None:
    """Switch on per-program run time accounting, or run without it where the kernel refuses.

    BPF_ENABLE_STATS needs CAP_SYS_ADMIN, which a least-privilege daemon does not hold; the
    kernel still counts when the sysctl kernel.bpf_stats_enabled is 1, so losing the fd loses
    nothing there, and elsewhere only the run-time metrics stay at zero.
    """
    try:
        return bpf.enable_run_time_stats()
    except bpf.BpfError as exc:
        if exc.errno != errno.EPERM:
            raise
        log.warning(
            "program run-time stats off: BPF_ENABLE_STATS needs CAP_SYS_ADMIN "
            "(or set the sysctl kernel.bpf_stats_enabled=1 on the node)"
        )
        return None
