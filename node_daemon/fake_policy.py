"""An in-memory policy datapath for the fake backend (`--backend fake --fake-policy`).

The daemon's real PolicyAgent runs over it: spec validation, slice reading, the incremental
encoding (policy_delta) and the write plan are the kernel path's own; only the last step
differs: map entries go into dicts instead of BPF maps, links are remembered instead of
created, and every endpoint IP resolves to an interface of its own without a route lookup.
So a machine can stand in for many policy-enforcing nodes and the control plane at scale
is measured as it is, down to which map entries each change would write.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.policy_datapath import FROM_POD, TO_POD, Attachment, PolicyDatapathError, SyncResult
from beekeeper.node_daemon.policy_delta import plan_writes
from beekeeper.node_daemon.routes import PodInterface, Unresolved

_PROG_IDS = {FROM_POD: 1, TO_POD: 2}


class FakeRoutes:
    """Every IPv4 endpoint is a local pod with an interface of its own, numbered after its address."""

    def pod_interface(self, ip: str) -> PodInterface | Unresolved:
        address = ipaddress.ip_address(ip)
        if address.version != 4:
            return Unresolved("IPv6 (fake node)")
        ifindex = int(address) & 0x7FFFFFFF or 1  # unique per address within 10/8 and most private ranges
        return PodInterface(ifindex, f"fake{ifindex}")

    def close(self) -> None:
        pass


class FakePolicyDatapath:
    """PolicyDatapath's interface (apply, attach, detach, attached, prune, counters, drops) over dicts."""

    def __init__(self, bpffs_dir: Path) -> None:
        self.dir = Path(bpffs_dir)
        self.maps: dict[str, dict[bytes, bytes]] = {spec.name: {} for spec in pm.SYNCED_MAPS}
        self.epoch = 0
        self._links: set[int] = set()
        self._closed = threading.Event()

    @property
    def prog_ids(self) -> dict[str, int]:
        return dict(_PROG_IDS)

    def attach(self, interface: str | int) -> Attachment:
        ifindex = _ifindex(interface)
        self._links.add(ifindex)
        return self._attachment(ifindex)

    def detach(self, interface: str | int) -> bool:
        ifindex = _ifindex(interface)
        if ifindex not in self._links:
            return False
        self._links.discard(ifindex)
        return True

    def attached(self) -> dict[str, Attachment]:
        return {a.ifname: a for a in map(self._attachment, sorted(self._links))}

    def prune(self) -> int:
        return 0  # fake interfaces never disappear behind the daemon's back

    def apply(
        self,
        desired: Mapping[str, Mapping[bytes, bytes]],
        touched: Mapping[str, Iterable[bytes]] | None,
        policy_names: Mapping[int, str],
        live: tuple[set[int], set[int]] | None,
    ) -> SyncResult:
        """What PolicyDatapath.apply writes, with its map capacity checked, into the dicts."""
        updates = deletes = 0
        for spec, upserts, removals in plan_writes(self.maps, desired, touched):
            held = self.maps[spec.name]
            if len(held.keys() | upserts.keys()) > spec.max_entries:
                raise PolicyDatapathError(f"writing map {spec.name}: it holds at most {spec.max_entries} entries")
            held.update(upserts)
            for key in removals:
                del held[key]
            updates, deletes = updates + len(upserts), deletes + len(removals)
        if updates or deletes:
            self.epoch = (self.epoch + 1) & 0xFFFFFFFF
        return SyncResult(updates, deletes, self.epoch)

    def counters(self) -> list[pm.Counter]:
        return []  # no packets pass through a fake node

    def drops(self, timeout: float = 0.0) -> Iterator[pm.DropEvent]:
        self._closed.wait(timeout)  # the drop recorder polls this: block like an empty ring buffer
        return iter(())

    def close(self) -> None:
        self._closed.set()

    def remove(self) -> None:
        self._links.clear()
        self.close()

    @staticmethod
    def _attachment(ifindex: int) -> Attachment:
        return Attachment(f"fake{ifindex}", ifindex, dict(_PROG_IDS), dict(_PROG_IDS))


def _ifindex(interface: str | int) -> int:
    if isinstance(interface, int):
        return interface
    if not interface.startswith("fake"):
        raise PolicyDatapathError(f"interface {interface} does not exist")
    return int(interface.removeprefix("fake"))
