"""The NetworkIdentityPolicy datapath of one node: load or adopt, attach, sync, observe.

bpf/policy.c is compiled at build time (clang, scripts/build_bpf.py) into policy.o, which
ships in the beekeeper.bpf package; libbpf loads its two tc programs, which every local
pod's host-side veth shares through tcx links. Nodes need no compiler or kernel headers.
Everything lives in bpffs, so the datapath outlives the daemon: a restarted daemon adopts
the pinned programs (same ids, nothing reloaded), maps and links, and traffic never sees a
gap. Policy and pod changes are map updates (sync), never reloads. A new build is loaded
next to the old one, reuses its pinned maps with their content (those of bcc-built
releases too: same names and layouts), and replaces it on every link atomically
(BPF_LINK_UPDATE).

Pin layout under bpffs_dir:

    maps/<map>                             created by the first load, shared by every build
    progs/<build>/policy_from_pod|to_pod   build = hash of policy.o
    links/<ifindex>_from_pod|to_pod        tcx ingress / egress links of one veth

(bpffs refuses names with a dot: they are reserved for its own files.)

One process manages a directory at a time; mutating calls are serialized by a lock.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import beekeeper.bpf
from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.capabilities import fstype_of
from beekeeper.node_daemon.libbpf import BpfObject, ObjectLoadFailed, ObjectOpenFailed
from beekeeper.node_daemon.policy_delta import plan_writes
from beekeeper.node_daemon.policy_syscalls import (
    RingBufferReader,
    map_delete,
    map_lookup,
    map_update,
    tcx_link_create_first,
)

log = logging.getLogger(__name__)

FROM_POD = "policy_from_pod"
"""tcx ingress of the host-side veth: what the pod sends (its egress)."""
TO_POD = "policy_to_pod"
"""tcx egress of the host-side veth: what the pod receives (its ingress)."""
_HOOKS = {FROM_POD: (bpf.ATTACH_TCX_INGRESS, "from_pod"), TO_POD: (bpf.ATTACH_TCX_EGRESS, "to_pod")}


class PolicyDatapathError(Exception):
    """The datapath cannot be loaded, adopted or changed; the message says what to do."""


@dataclass(frozen=True)
class Attachment:
    """The policy programs on one veth."""

    ifname: str
    ifindex: int
    link_ids: dict[str, int]
    """program (FROM_POD / TO_POD) -> tcx link id."""
    prog_ids: dict[str, int]
    """program -> id of the program the link runs."""


@dataclass(frozen=True)
class SyncResult:
    updates: int
    deletes: int
    epoch: int
    """The policy epoch after the sync; it moves when anything changed, so established
    flows are checked against the new policy on their next packet."""
    missing_interfaces: list[str | int] = field(default_factory=list)
    ignored_ipv6: int = 0


def policy_object() -> bytes:
    """The compiled datapath, bpf/policy.o, as shipped in the beekeeper.bpf package."""
    # importlib.resources cannot read namespace packages installed in editable mode (3.11)
    for directory in beekeeper.bpf.__path__:
        path = Path(directory) / "policy.o"
        if path.is_file():
            return path.read_bytes()
    raise PolicyDatapathError(
        f"policy.o is missing from the beekeeper.bpf package ({', '.join(beekeeper.bpf.__path__)}): it is built "
        "from bpf/policy.c at build time, by scripts/install.sh in a checkout and by pip when it builds the wheel "
        "(both run scripts/build_bpf.py, which needs clang and libbpf-dev)"
    )


def _interface(interface: str | int) -> tuple[int, str] | None:
    """(ifindex, name) of an existing interface given by name or index."""
    try:
        if isinstance(interface, int):
            return interface, socket.if_indextoname(interface)
        return socket.if_nametoindex(interface), interface
    except OSError:
        return None


def _ifindex_of(interface: str | int) -> int | None:
    found = _interface(interface)
    return found[0] if found else None


class PolicyDatapath:
    """Load-or-adopt the policy programs and maps pinned under bpffs_dir."""

    def __init__(self, bpffs_dir: Path) -> None:
        self.dir = Path(bpffs_dir)
        self._maps_dir = self.dir / "maps"
        self._links_dir = self.dir / "links"
        self._lock = threading.Lock()
        self._policy_names: dict[int, str] = {}
        self._written: dict[str, dict[bytes, bytes]] | None = None
        """The synced maps' content as of the last sync (None: unknown, read the kernel's)."""
        self._pending: deque[bytes] = deque()
        self._reader: RingBufferReader | None = None
        self._maps: dict[str, bpf.OwnedFd] = {}
        self._progs: dict[str, bpf.OwnedFd] = {}
        self._prog_ids: dict[str, int] = {}
        self._cpus = bpf.possible_cpus()
        if fstype_of(str(self.dir)) != "bpf":
            raise PolicyDatapathError(f"{self.dir} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")
        self._object = policy_object()
        self.build_id = hashlib.sha256(self._object).hexdigest()[:12]
        try:
            self._maps_dir.mkdir(parents=True, exist_ok=True)
            self._links_dir.mkdir(exist_ok=True)
        except OSError as exc:  # bpffs refuses names with a dot (EPERM)
            raise PolicyDatapathError(f"cannot create {self.dir} in bpffs: {exc.strerror}") from None
        try:
            self._load_or_adopt()
        except BaseException:
            self.close()
            raise

    # --- loading ---------------------------------------------------------------------------

    def _load_or_adopt(self) -> None:
        progs_dir = self.dir / "progs" / self.build_id
        for spec in pm.MAP_SPECS:  # before loading: say which map differs, and how to recover
            if (self._maps_dir / spec.name).exists():
                with bpf.obj_get(str(self._maps_dir / spec.name)) as fd:
                    self._check_layout(fd.fd, spec)
        complete = all((progs_dir / p).exists() for p in _HOOKS) and all(
            (self._maps_dir / s.name).exists() for s in pm.MAP_SPECS
        )
        if complete:
            self._progs = {p: bpf.obj_get(str(progs_dir / p)) for p in _HOOKS}
            self._prog_ids = {p: bpf.prog_info(fd.fd).id for p, fd in self._progs.items()}
            log.info("adopted policy datapath build %s in %s (programs %s)", self.build_id, self.dir, self.prog_ids)
        else:
            self._load(progs_dir)
        self._maps = {s.name: bpf.obj_get(str(self._maps_dir / s.name)) for s in pm.MAP_SPECS}
        for spec in pm.MAP_SPECS:
            self._check_layout(self._maps[spec.name].fd, spec)
        self._adopt_links()
        for old in (self.dir / "progs").iterdir():
            if old.name != self.build_id:
                log.info("unpinning superseded policy programs %s", old)
                shutil.rmtree(old)

    def _load(self, progs_dir: Path) -> None:
        """Load policy.o; its maps are the pinned ones where they exist, else created and pinned."""
        started = time.monotonic()
        try:
            with BpfObject.open(self._object, name="policy") as obj:
                for spec in pm.MAP_SPECS:
                    obj.set_pin_path(spec.name, str(self._maps_dir / spec.name))
                obj.load()
                progs = {p: obj.program_fd(p) for p in _HOOKS}
        except ObjectOpenFailed as exc:
            raise PolicyDatapathError(f"policy.o of the beekeeper.bpf package is unusable: {exc.message}") from None
        except ObjectLoadFailed as exc:
            raise PolicyDatapathError(f"the kernel rejected policy.o: {exc.message}") from None
        progs_dir.mkdir(parents=True, exist_ok=True)
        for name, fd in progs.items():
            (progs_dir / name).unlink(missing_ok=True)
            bpf.obj_pin(fd.fd, str(progs_dir / name))
        self._progs = progs
        self._prog_ids = {p: bpf.prog_info(fd.fd).id for p, fd in progs.items()}
        log.info(
            "loaded policy datapath build %s in %s in %.3f s (programs %s)",
            self.build_id,
            self.dir,
            time.monotonic() - started,
            self.prog_ids,
        )

    def _check_layout(self, fd: int, spec: pm.MapSpec) -> None:
        info = bpf.map_info(fd)
        have = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
        want = (spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
        if have != want:
            raise PolicyDatapathError(
                f"map {self._maps_dir / spec.name} has (type, key size, value size, max entries, flags) {have}, "
                f"this version needs {want}: remove {self.dir} (this detaches the policy) to recreate it"
            )

    def _adopt_links(self) -> None:
        """Point every live link at this build's programs (a no-op unless it just changed)."""
        for pin in self._links_dir.iterdir():
            prog = self._prog_of_pin(pin)
            if prog is not None:
                with bpf.obj_get(str(pin)) as link:
                    self._update_link(link.fd, prog, bpf.link_info(link.fd))

    def _update_link(self, link_fd: int, prog: str, info: bpf.LinkInfo) -> None:
        # a link whose veth is gone cannot be updated (ENOLINK); prune() unpins it
        if info.ifindex and info.prog_id != self._prog_ids[prog]:
            bpf.link_update(link_fd, self._progs[prog].fd)
            log.info("tcx link %d now runs %s %d", info.id, prog, self._prog_ids[prog])

    @staticmethod
    def _prog_of_pin(pin: Path) -> str | None:
        suffix = pin.name.partition("_")[2]
        return next((p for p, (_, s) in _HOOKS.items() if s == suffix), None)

    @property
    def prog_ids(self) -> dict[str, int]:
        return dict(self._prog_ids)

    # --- links -----------------------------------------------------------------------------

    def attach(self, interface: str | int) -> Attachment:
        """Attach both programs to a veth, first in its tcx chains; idempotent."""
        found = _interface(interface)
        if found is None:
            raise PolicyDatapathError(f"interface {interface} does not exist")
        ifindex, ifname = found
        link_ids = {}
        with self._lock:
            for prog, (attach_type, suffix) in _HOOKS.items():
                pin = self._links_dir / f"{ifindex}_{suffix}"
                try:
                    if pin.exists():
                        with bpf.obj_get(str(pin)) as link:
                            info = bpf.link_info(link.fd)
                            if info.ifindex == ifindex:
                                self._update_link(link.fd, prog, info)
                                link_ids[prog] = info.id
                                continue
                        pin.unlink()  # its veth is gone and the index was given to another
                    with tcx_link_create_first(self._progs[prog].fd, ifindex, attach_type) as link:
                        bpf.obj_pin(link.fd, str(pin))
                        link_ids[prog] = bpf.link_info(link.fd).id
                except bpf.BpfError as exc:
                    raise PolicyDatapathError(f"attaching {prog} to {ifname}: {exc.strerror}") from None
        log.debug("policy attached to %s (ifindex %d)", ifname, ifindex)
        return Attachment(ifname, ifindex, link_ids, self.prog_ids)

    def detach(self, interface: str | int) -> bool:
        """Detach both programs from a veth; False if they were not attached.

        When the veth is already gone the kernel has detached them; prune() unpins those.
        """
        ifindex = interface if isinstance(interface, int) else _ifindex_of(interface)
        if ifindex is None:
            return False
        removed = False
        with self._lock:
            for _, suffix in _HOOKS.values():
                pin = self._links_dir / f"{ifindex}_{suffix}"
                if pin.exists():
                    self._unpin_link(pin)
                    removed = True
        return removed

    def attached(self) -> dict[str, Attachment]:
        """ifname -> attachment, for links whose veth still exists."""
        found: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        for pin in sorted(self._links_dir.iterdir()):
            prog = self._prog_of_pin(pin)
            if prog is None:
                continue
            try:
                with bpf.obj_get(str(pin)) as link:
                    info = bpf.link_info(link.fd)
            except bpf.BpfError as exc:
                if exc.errno == errno.ENOENT:  # detached meanwhile
                    continue
                raise
            if info.ifindex:
                links, progs = found.setdefault(info.ifindex, ({}, {}))
                links[prog], progs[prog] = info.id, info.prog_id
        out = {}
        for ifindex, (links, progs) in found.items():
            named = _interface(ifindex)
            if named:
                out[named[1]] = Attachment(named[1], ifindex, links, progs)
        return out

    def prune(self) -> int:
        """Unpin links whose veth is gone (the kernel detached them); returns how many."""
        pruned = 0
        with self._lock:
            for pin in list(self._links_dir.iterdir()):
                with bpf.obj_get(str(pin)) as link:
                    gone = bpf.link_info(link.fd).ifindex == 0
                if gone:
                    pin.unlink()
                    pruned += 1
        return pruned

    @staticmethod
    def _unpin_link(pin: Path) -> None:
        with bpf.obj_get(str(pin)) as link:
            bpf.link_detach(link.fd)  # now, even if another process holds the link open
        pin.unlink()

    # --- maps ------------------------------------------------------------------------------

    def sync(self, state: pm.DatapathState) -> SyncResult:
        """Make the maps hold exactly `state`, writing only what differs (see apply()).

        All input is validated before the first write.
        """
        encoded = pm.encode(state, _ifindex_of)
        indexes = set(state.policy_names) | {r.policy_index for r in state.rules}
        live = (indexes, {ep.identity for ep in state.endpoints})
        result = self.apply(encoded.maps, None, state.policy_names, live)
        if encoded.missing_interfaces:
            log.info("endpoints without an interface yet: %s", encoded.missing_interfaces)
        return SyncResult(
            result.updates, result.deletes, result.epoch, encoded.missing_interfaces, encoded.ignored_ipv6
        )

    def apply(
        self,
        desired: Mapping[str, Mapping[bytes, bytes]],
        touched: Mapping[str, Iterable[bytes]] | None,
        policy_names: Mapping[int, str],
        live: tuple[set[int], set[int]] | None,
    ) -> SyncResult:
        """Make the synced maps hold `desired` (map name -> key -> value), writing only what differs.

        touched names the keys that may differ from the last apply; None compares every key.
        The maps are read once (the first apply after loading or adopting them, or after a
        failed one, whatever touched says); later applies diff against what this object last
        wrote, so a change costs its own map writes, not a scan of every map. Additions go
        first and removals last (see SYNCED_MAPS); then the policy epoch moves, so
        established flows are judged against the final state on their next packet, and one
        it denies is revoked. live: the policy indexes and endpoint identities in use, whose
        counters stay (None: no counter can be stale, none is looked at).
        """
        with self._lock:
            if self._written is None:
                self._written = {
                    spec.name: dict(bpf.map_items(self._maps[spec.name].fd, spec.key_size, spec.value_size))
                    for spec in pm.SYNCED_MAPS
                }
                touched = None
            plan = plan_writes(self._written, desired, touched)
            updates = deletes = 0
            try:
                for spec, upserts, _ in plan:
                    written = self._written[spec.name]
                    for key, value in upserts.items():
                        self._write(spec, map_update, key, value)
                        written[key] = value
                        updates += 1
                for spec, _, removals in reversed(plan):
                    written = self._written[spec.name]
                    for key in removals:
                        self._write(spec, map_delete, key)
                        del written[key]
                        deletes += 1
            except BaseException:
                self._written = None  # partly written: read the kernel's maps again next time
                raise
            finally:  # even a partial sync must reach the established flows
                epoch = self._bump_epoch() if updates or deletes else self.epoch
            self._policy_names = dict(policy_names)
            if live is not None:
                self._drop_stale_counters(*live)
        log.debug("policy sync: %d updates, %d deletes, epoch %d", updates, deletes, epoch)
        return SyncResult(updates, deletes, epoch)

    def _write(self, spec: pm.MapSpec, op: Callable[..., object], *args: bytes) -> None:
        try:
            op(self._maps[spec.name].fd, *args)
        except bpf.BpfError as exc:
            hint = f" (it holds at most {spec.max_entries} entries)" if exc.errno in (errno.E2BIG, errno.ENOSPC) else ""
            raise PolicyDatapathError(f"writing map {spec.name}: {exc.strerror}{hint}") from exc

    @property
    def epoch(self) -> int:
        raw = map_lookup(self._maps[pm.POLICY_EPOCH.name].fd, pm.EPOCH_KEY.pack(0), 4)
        return struct.unpack("<I", raw or b"\0\0\0\0")[0]

    def _bump_epoch(self) -> int:
        epoch = (self.epoch + 1) & 0xFFFFFFFF
        map_update(self._maps[pm.POLICY_EPOCH.name].fd, pm.EPOCH_KEY.pack(0), struct.pack("<I", epoch))
        return epoch

    def _drop_stale_counters(self, indexes: set[int], identities: set[int]) -> None:
        fd = self._maps[pm.COUNTERS.name].fd
        keys = [k for k, _ in bpf.map_items(fd, pm.COUNTER_KEY.size, pm.COUNTER_VALUE.size * self._cpus)]
        for key in pm.stale_counter_keys(keys, indexes, identities):
            map_delete(fd, key)

    # --- observation -----------------------------------------------------------------------

    def counters(self) -> list[pm.Counter]:
        """Packet and byte counts per policy (allow, deny), endpoint identity (default deny) and drop reason."""
        fd = self._maps[pm.COUNTERS.name].fd
        items = bpf.map_items(fd, pm.COUNTER_KEY.size, pm.COUNTER_VALUE.size * self._cpus)
        decoded = (pm.decode_counter(k, v, self._cpus, self._policy_names) for k, v in items)
        return [c for c in decoded if c is not None]

    def drops(self, timeout: float = 0.0) -> Iterator[pm.DropEvent]:
        """The drop events queued since the last call, waiting up to timeout seconds for one.

        The ring buffer has one consumer position: read it from one thread of one process.
        """
        if self._reader is None:
            self._reader = RingBufferReader(self._maps[pm.DROP_EVENTS.name].fd, self._pending.append)
        self._reader.poll(int(timeout * 1000))
        while self._pending:
            yield pm.decode_drop_event(self._pending.popleft(), self._policy_names)

    def flows(self) -> list[pm.FlowEntry]:
        """The conntrack entries: which flows pass without a policy lookup, and why."""
        spec = pm.CONNTRACK
        items = bpf.map_items(self._maps[spec.name].fd, spec.key_size, spec.value_size)
        return [pm.decode_flow(k, v) for k, v in items]

    # --- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's handles; the pinned datapath keeps running."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for fd in [*self._maps.values(), *self._progs.values()]:
            fd.close()
        self._maps, self._progs = {}, {}

    def remove(self) -> None:
        """Detach from every veth and unpin everything; the kernel then frees it all."""
        with self._lock:
            for pin in list(self._links_dir.iterdir()):
                self._unpin_link(pin)
            self.close()
            shutil.rmtree(self.dir)
        log.info("policy datapath removed from %s", self.dir)

    def __enter__(self) -> PolicyDatapath:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
