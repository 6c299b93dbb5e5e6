"""The node side of NetworkIdentityPolicy: spec.networkPolicy and its slices in, datapath converged, status out.

One PolicyDatapath per node (compiled once, or adopted from bpffs after a restart without
reloading anything). Each reconcile finds every endpoint's host-side interface from the
kernel's route to its IP, writes only the map entries that differ, attaches the programs
to new pod interfaces and detaches them from departed ones. A policy or label change is
therefore a handful of map writes; the programs, and their ids, stay as they are.

The reconcile loop is the only caller of reconcile/close; observe() and the drop recorder
run on other threads, so the datapath handle is swapped and used under a lock.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from beekeeper.crds.nodestate import Endpoint as SpecEndpoint
from beekeeper.crds.nodestate import NetworkPolicyStatus, NodeNetworkPolicy
from beekeeper.node_daemon import policy_delta as pd
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.drops import DropLog, DropRecorder
from beekeeper.node_daemon.policy_datapath import Attachment, PolicyDatapath, PolicyDatapathError, SyncResult
from beekeeper.node_daemon.policy_index import PolicyIndexes
from beekeeper.node_daemon.policy_slices import SliceReader
from beekeeper.node_daemon.policy_state import Translation, node_endpoints, pod_name, policy_names
from beekeeper.node_daemon.routes import PodInterface, RouteTable, Unresolved

log = logging.getLogger(__name__)

MAX_MISSING = 64
"""status.networkPolicy.missing lists at most this many IPs."""


@dataclass(frozen=True)
class PolicyObservation:
    """What the metrics endpoint reports about the datapath, read at scrape time."""

    counters: list[pm.Counter]
    program_ids: dict[str, int]
    endpoints: int
    attached: int
    unresolved: int


class Datapath(Protocol):
    """What the agent needs of a datapath: PolicyDatapath (the kernel), or fake_policy's in-memory twin."""

    @property
    def prog_ids(self) -> dict[str, int]: ...
    def attach(self, interface: str | int) -> Attachment: ...
    def detach(self, interface: str | int) -> bool: ...
    def attached(self) -> dict[str, Attachment]: ...
    def prune(self) -> int: ...
    def apply(
        self,
        desired: Mapping[str, Mapping[bytes, bytes]],
        touched: Mapping[str, Iterable[bytes]] | None,
        policy_names: Mapping[int, str],
        live: tuple[set[int], set[int]] | None,
    ) -> SyncResult: ...
    def counters(self) -> list[pm.Counter]: ...
    def drops(self, timeout: float = 0.0) -> Iterator[pm.DropEvent]: ...
    def close(self) -> None: ...
    def remove(self) -> None: ...


class Routes(Protocol):
    """Endpoint IP -> host-side interface: RouteTable (the kernel's routes), or fake_policy's."""

    def pod_interface(self, ip: str) -> PodInterface | Unresolved: ...
    def close(self) -> None: ...


def _holds_endpoints(obj: Mapping[str, Any] | None) -> bool:
    """Whether a watched slice object carries endpoints (read without the model, which may refuse it)."""
    spec = (obj or {}).get("spec")
    return isinstance(spec, Mapping) and "endpoints" in spec


class PolicyAgent:
    """Converges this node's policy datapath to spec.networkPolicy."""

    def __init__(
        self,
        node: str,
        bpffs_dir: Path,
        state_dir: Path,
        drop_log: DropLog,
        datapath: Callable[[Path], Datapath] = PolicyDatapath,
        routes: Routes | None = None,
    ) -> None:
        """datapath opens (loads or adopts) the datapath under bpffs_dir; routes resolves endpoints
        (the kernel's by default). The fake backend passes in-memory twins of both."""
        self.node = node
        self.bpffs_dir = Path(bpffs_dir)
        self.drop_log = drop_log
        self._indexes = PolicyIndexes(Path(state_dir) / "policy-indexes.json")
        self._slices = SliceReader()
        self._open = datapath
        self._routes: Routes = routes if routes is not None else RouteTable()
        self._lock = threading.Lock()
        self._datapath: Datapath | None = None
        self._recorder: DropRecorder | None = None
        self._endpoint_names: dict[int, str] = {}
        self._counts = (0, 0, 0)
        self._unresolved: dict[str, str] = {}
        self._synced_generation: int | None = None
        self._synced_revision: str | None = None
        self._last_sync: dt.datetime | None = None
        self._restored = False
        self._rules = 0
        self._spec: tuple[dict[str, Any], NodeNetworkPolicy | str] | None = None
        self._maps = pd.NodeMaps()
        self._interfaces: dict[str, PodInterface | Unresolved] = {}
        self._linked: tuple[frozenset[int], tuple[tuple[str, int], ...]] | None = None
        """The interfaces and programs the links were last made for (None: look at the links)."""
        self._attached: set[int] = set()
        self._link_problems: list[str] = []
        self._live: tuple[set[int], set[int]] | None = None
        self.map_writes = {"update": 0, "delete": 0}
        """Policy map entries written and deleted by syncs since the daemon started (for /metrics)."""

    @property
    def rules(self) -> int:
        """Policy rules in the maps, as last synced."""
        return self._rules

    @property
    def unresolved(self) -> int:
        """Endpoints in spec still waiting for their interface."""
        return len(self._unresolved)

    def reconcile(
        self,
        raw: Mapping[str, Any] | None,
        generation: int | None,
        previous: Mapping[str, Any] | None = None,
        slices: Mapping[str, Mapping[str, Any]] | None = None,
        rescan: bool = True,
    ) -> dict[str, Any] | None:
        """Converge to spec.networkPolicy (raw) and the BpfPolicySlices it lists (slices: name -> object, this
        node's as watched); returns status.networkPolicy, None when there is no policy.

        previous is the status this node last reported (read once, so a restarted daemon
        keeps lastSyncTime and observedGeneration). No spec removes the datapath. Until every
        listed slice has arrived with the listed content hash the maps stay as they are (a
        partial set could isolate a pod before its allows arrive); a slice this daemon cannot
        read is left out and reported, and the rest is applied, but for an endpoint slice, which
        holds the maps as they are (left out, its pods would lose enforcement). The work follows the change:
        only new or changed slices are validated and encoded, only the map entries they
        touch are compared and written. rescan looks every endpoint's interface up again and
        checks every link (host changes, resyncs); without it only endpoints not placed yet are.
        """
        if not self._restored:
            self._restored = True
            self._synced_generation = (previous or {}).get("observedGeneration")
            self._synced_revision = (previous or {}).get("observedRevision")
            if previous and previous.get("lastSyncTime"):
                self._last_sync = dt.datetime.fromisoformat(previous["lastSyncTime"])
        if raw is None:
            self.remove()
            return None
        spec = self._validate(raw)
        if isinstance(spec, str):
            return self._status(None, None, 0, spec)
        listed, waiting, unreadable = self._slices.resolve(spec.slices or [], slices or {})
        endpoints = node_endpoints(spec, listed)
        # Without an endpoint slice its pods would be detached (unenforced): hold, as for an unreadable spec.
        unread = [
            r.name for r in spec.slices or [] if r.name not in listed and _holds_endpoints((slices or {}).get(r.name))
        ]
        if waiting or unread:
            if waiting:
                shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
                problem = f"waiting for policy slices: {shown}"
            else:
                problem = f"{'; '.join(unreadable)}; the maps keep the last state with its endpoints"
            # The maps keep enforcing the last complete state (pinned, also across a restart of this
            # daemon); observedGeneration says which.
            loaded = self._datapath is not None or bool((previous or {}).get("enforcing"))
            if self._datapath is not None:
                held, attached = self._counts[0], self._counts[1]
            else:
                held, attached = (int((previous or {}).get(k) or 0) for k in ("endpoints", "attached"))
            return self._status(held, None, attached, problem, loaded)
        try:
            datapath = self._load()
        except PolicyDatapathError as exc:
            return self._status(len(endpoints), None, 0, str(exc))
        indexes = self._indexes.assign(policy_names(spec, listed.values()))
        try:
            plan = self._maps.update(spec, listed, indexes, self._lookup(endpoints, rescan))
        except ValueError as exc:
            return self._status(len(endpoints), None, len(self._attached), f"maps not synced: {exc}")
        plan.problems.extend(unreadable)
        rules = self._maps.rules
        with self._lock:
            synced, attached, problems = self._converge(datapath, plan, generation, rescan)
        if synced:
            self._synced_generation, self._synced_revision = generation, spec.revision
            self._rules = rules
        self._report_unresolved(plan.unresolved)
        return self._status(len(endpoints), plan, attached, "; ".join(problems) or None, rules=rules)

    def _validate(self, raw: Mapping[str, Any]) -> NodeNetworkPolicy | str:
        """spec.networkPolicy as a model (the last one again while raw is unchanged), or what is wrong with it."""
        if self._spec is not None and self._spec[0] == raw:
            return self._spec[1]
        try:
            spec: NodeNetworkPolicy | str = NodeNetworkPolicy.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            spec = f"spec.networkPolicy not understood by this daemon: {where}: {first['msg']}"
        self._spec = (copy.deepcopy(dict(raw)), spec)
        return spec

    def _lookup(self, endpoints: Iterable[SpecEndpoint], rescan: bool) -> dict[str, PodInterface | Unresolved]:
        """Each endpoint IP's interface: all looked up on a rescan, else only those not found yet."""
        found: dict[str, PodInterface | Unresolved] = {}
        for ep in endpoints:
            known = None if rescan else self._interfaces.get(ep.ip)
            if isinstance(known, PodInterface):
                found[ep.ip] = known
                continue
            try:
                found[ep.ip] = self._routes.pod_interface(ep.ip)
            except OSError as exc:
                found[ep.ip] = Unresolved(f"route lookup failed: {exc.strerror}")
        self._interfaces = found
        return found

    def _converge(
        self, datapath: Datapath, plan: Translation, generation: int | None, rescan: bool
    ) -> tuple[bool, int, list[str]]:
        """Maps first (a new pod's entry is in place when its programs start), then links.

        Returns whether the maps hold this generation, how many endpoints are attached, and
        what keeps the node from enforcing all of it. The links are looked at only when the
        endpoints' interfaces or the programs changed, or on a rescan.
        """
        live = (set(plan.state.policy_names), {ep.identity for ep in plan.state.endpoints})
        stale = self._live is None or not (self._live[0] <= live[0] and self._live[1] <= live[1])
        try:
            desired = self._maps.desired
            result = datapath.apply(
                desired.maps, desired.take_touched(), plan.state.policy_names, live if stale else None
            )
        except PolicyDatapathError as exc:
            return False, len(self._attached), [f"maps not synced: {exc}"]
        self._live = live
        self.map_writes["update"] += result.updates
        self.map_writes["delete"] += result.deletes
        problems = list(plan.problems)
        linked = (frozenset(plan.interfaces), tuple(sorted(datapath.prog_ids.items())))
        detached = pruned = 0
        if rescan or linked != self._linked:
            before = {a.ifindex: a.prog_ids for a in datapath.attached().values()}
            failed = []
            for ifindex, ep in plan.interfaces.items():
                if before.get(ifindex) != datapath.prog_ids:
                    try:
                        datapath.attach(ifindex)
                    except PolicyDatapathError as exc:
                        failed.append(f"{pod_name(ep)}: {exc}")
            for ifindex in before.keys() - plan.interfaces.keys():
                datapath.detach(ifindex)
            pruned = datapath.prune()
            after = {a.ifindex for a in datapath.attached().values()}
            detached = len(before.keys() - after)
            self._attached = after & plan.interfaces.keys()
            self._link_problems = failed
            self._linked = None if failed else linked  # a failed attach is retried at the next reconcile
            relinked = after != before.keys() or bool(pruned)
        else:
            relinked = False
        problems += self._link_problems
        self._endpoint_names = {i: pod_name(ep) for i, ep in plan.interfaces.items()}
        attached = len(self._attached)
        endpoints = len(plan.state.endpoints) + len(plan.unresolved) + len(plan.problems)
        self._counts = (endpoints, attached, len(plan.unresolved))
        if result.updates or result.deletes or relinked:
            self._last_sync = dt.datetime.now(dt.UTC).replace(microsecond=0)
            log.info(
                "policy datapath synced",
                extra={
                    "node": self.node,
                    "generation": generation,
                    "updates": result.updates,
                    "deletes": result.deletes,
                    "epoch": result.epoch,
                    "attached": attached,
                    "detached": detached,
                    "unresolved": len(plan.unresolved),
                },
            )
        return True, attached, problems

    def _report_unresolved(self, unresolved: dict[str, str]) -> None:
        if unresolved != self._unresolved:
            for ip, reason in sorted(unresolved.items()):
                if self._unresolved.get(ip) != reason:
                    log.info("endpoint has no pod interface yet", extra={"node": self.node, "ip": ip, "why": reason})
            self._unresolved = dict(unresolved)

    def _status(
        self,
        endpoints: int | None,
        plan: Translation | None,
        attached: int,
        problem: str | None,
        enforcing: bool | None = None,
        rules: int | None = None,
    ) -> dict[str, Any]:
        missing = sorted(plan.unresolved) if plan else []
        return NetworkPolicyStatus(
            enforcing=problem is None if enforcing is None else enforcing,
            endpoints=endpoints or 0,
            attached=attached,
            missing=missing[:MAX_MISSING] or None,
            rules=rules if rules is not None else (self._rules if endpoints is not None else 0),
            observed_generation=self._synced_generation,
            observed_revision=self._synced_revision,
            last_sync_time=self._last_sync,
            message=problem[:2048] if problem else None,
        ).to_dict()

    def _load(self) -> Datapath:
        if self._datapath is None:
            datapath = self._open(self.bpffs_dir)
            with self._lock:
                self._datapath = datapath
            self._recorder = DropRecorder(datapath, self.drop_log, self._endpoint_name)
            log.info("policy datapath ready", extra={"node": self.node, "programs": datapath.prog_ids})
        return self._datapath

    def _endpoint_name(self, ifindex: int) -> str | None:
        return self._endpoint_names.get(ifindex)

    def observe(self) -> PolicyObservation | None:
        """Counters and sizes for the metrics endpoint (any thread); None while no datapath is loaded."""
        with self._lock:
            if self._datapath is None:
                return None
            return PolicyObservation(self._datapath.counters(), self._datapath.prog_ids, *self._counts)

    def remove(self) -> None:
        """Detach from every pod interface and unpin the datapath (no policy on this node any more)."""
        datapath = self._release()
        if datapath is None and self.bpffs_dir.exists():
            try:
                datapath = self._open(self.bpffs_dir)  # pinned by an earlier run: adopt it to remove it
            except PolicyDatapathError as exc:
                log.warning("cannot remove the policy datapath", extra={"node": self.node, "error": str(exc)})
                return
        if datapath is not None:
            datapath.remove()
            self._counts, self._unresolved, self._synced_generation = (0, 0, 0), {}, None
            self._synced_revision = None
            self._maps = pd.NodeMaps()
            log.info("policy datapath removed", extra={"node": self.node})

    def close(self) -> None:
        """Release handles at daemon exit; the pinned datapath keeps enforcing."""
        datapath = self._release()
        if datapath is not None:
            datapath.close()
        self._routes.close()

    def _release(self) -> Datapath | None:
        if self._recorder is not None:
            self._recorder.stop()  # the only ring buffer reader: stop it before its datapath goes
            self._recorder = None
        with self._lock:
            datapath, self._datapath = self._datapath, None
        self._linked, self._live, self._attached, self._link_problems = None, None, set(), []
        return datapath
