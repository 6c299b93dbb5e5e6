"""This node's BpfPolicySlices: watched into a store, read into validated models.

The daemon watches only the slices of its own node (server-side field selector on
spec.nodeName, a selectable field of the CRD), so its load grows with its own pods'
policies, not with the cluster. A relist replaces the store, so a slice deleted during a
watch gap is gone here too. Validated models are kept per (name, resourceVersion): a
slice is parsed once, not on every sync of the node.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from beekeeper.crds.names import BPF_POLICY_SLICE_PLURAL
from beekeeper.crds.nodestate import IpcacheEntry, SliceRef
from beekeeper.crds.policyslice import BpfPolicySliceSpec, IdentityAddresses
from beekeeper.node_daemon.list_watch import list_watch


class SliceStore:
    """name -> the newest BpfPolicySlice object of this node; written by the watch thread, read by the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._objects)

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._objects = {item["metadata"]["name"]: dict(item) for item in items}

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._objects.pop(obj["metadata"]["name"], None)
            else:
                self._objects[obj["metadata"]["name"]] = dict(obj)


def watch_slices(
    api: client.CustomObjectsApi, node: str, store: SliceStore, changed: Callable[[], None], stop: threading.Event
) -> None:
    """List+watch this node's slices forever, calling changed() after every change to the store."""

    def listed(items: list[dict[str, Any]]) -> None:
        store.replace(items)
        changed()

    def observed(event_type: str, obj: dict[str, Any]) -> None:
        store.observe(event_type, obj)
        changed()

    list_watch(api, BPF_POLICY_SLICE_PLURAL, f"spec.nodeName={node}", listed, observed, stop, "slice watch", node)


def reuse_entries(items: list[Any], previous: Sequence[IpcacheEntry | IdentityAddresses]) -> list[Any]:
    """items, with every one equal to an entry of the version before handed over as that (validated) model:
    pydantic takes model instances as they are, so only new entries are validated again; the list's own
    checks (length, unique prefixes) still run over all of them."""
    known: dict[tuple[object, object], IpcacheEntry | IdentityAddresses] = {_entry_key(e): e for e in previous}
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict) and len(item) == 2 and type(item.get("identity")) is int:
            key = (item.get("cidr"), item["identity"]) if "cidr" in item else _group_key(item)
            out.append(known.get(key, item) if key is not None else item)
        else:
            out.append(item)
    return out


def _entry_key(entry: IpcacheEntry | IdentityAddresses) -> tuple[object, object]:
    if isinstance(entry, IdentityAddresses):
        return (tuple(entry.cidrs), entry.identity)
    return (entry.cidr, entry.identity)


def _group_key(item: Mapping[str, Any]) -> tuple[object, object] | None:
    """An ipcache group's key, as _entry_key makes it (None when it is not a list of addresses)."""
    cidrs = item.get("cidrs")
    if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
        return None  # left to the model's own error
    return (tuple(cidrs), item["identity"])


class SliceReader:
    """The listed slices as models; parsed once per version (the same model object until it changes)."""

    def __init__(self) -> None:
        self._parsed: dict[str, tuple[tuple[str | None, str | None], BpfPolicySliceSpec | str]] = {}

    def _parse(self, name: str, obj: Mapping[str, Any]) -> BpfPolicySliceSpec | str:
        # The content hash keys slices handed over without metadata (benchmarks, tests); a hand edit
        # that keeps the hash still moves resourceVersion.
        version = ((obj.get("metadata") or {}).get("resourceVersion"), (obj.get("spec") or {}).get("contentHash"))
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == version and version != (None, None):
            return cached[1]
        spec = dict(obj.get("spec") or {})
        if cached is not None and not isinstance(cached[1], str):  # most entries carry over from the version before
            for field, previous in (("ipcache", cached[1].ipcache), ("cidrIdentities", cached[1].cidr_identities)):
                if isinstance(spec.get(field), list) and previous:
                    spec[field] = reuse_entries(spec[field], previous)
        try:
            parsed: BpfPolicySliceSpec | str = BpfPolicySliceSpec.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            parsed = f"slice {name} not understood by this daemon: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        self._parsed[name] = (version, parsed)
        return parsed

    def resolve(
        self, refs: Sequence[SliceRef], objects: Mapping[str, Mapping[str, Any]]
    ) -> tuple[dict[str, BpfPolicySliceSpec], list[str], list[str]]:
        """(listed slices by name, names still missing or not yet at the listed hash, unreadable ones' problems)."""
        found: dict[str, BpfPolicySliceSpec] = {}
        waiting: list[str] = []
        problems: list[str] = []
        for ref in refs:
            obj = objects.get(ref.name)
            declared = ((obj or {}).get("spec") or {}).get("contentHash")
            if obj is None or declared != ref.content_hash:
                cached = self._parsed.get(ref.name)
                if obj is not None and cached is not None and cached[0][1] == ref.content_hash:
                    # Already past the listed version, which was read before: the operator writes slices
                    # before the node state that lists them, so the new listing follows; until then the
                    # listed version stays what the maps hold (no "waiting" report, no status write).
                    if isinstance(cached[1], str):
                        problems.append(cached[1])
                    else:
                        found[ref.name] = cached[1]
                    continue
                waiting.append(ref.name)
                continue
            parsed = self._parse(ref.name, obj)
            if isinstance(parsed, str):
                problems.append(parsed)
            else:
                found[ref.name] = parsed
        for name in set(self._parsed) - {ref.name for ref in refs}:
            del self._parsed[name]
        return found, waiting, problems
