"""A policy's Ready on a node follows the revisions that moved its own part, not every revision."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from beekeeper.operator.policy_compile import PolicyOutcome
from beekeeper.operator.policy_revisions import Endpoints, RevisionLog, listed_endpoints, moved
from beekeeper.operator.policy_status import NodeEnforcement, aggregate

NOW = "2026-12-03T10:00:00Z"
OWNER_OF = {"n1.aaa-0": {"shop/a"}, "n1.bbb-0": {"shop/b"}, "n1.bbb-1": {"shop/b"}, "n1.id300-0": {"shop/a", "shop/b"}}


def owners(name: str) -> set[str]:
    return OWNER_OF.get(name, set())


POD = {"namespace": "shop", "pod": "web-1", "ip": "10.0.0.1", "identity": 300, "ingressEnforced": True}
OTHER = {"namespace": "shop", "pod": "db-1", "ip": "10.0.0.2", "identity": 301, "ingressEnforced": False}
ENDPOINTS = [POD]
SELECTED = {"shop/a": {"shop/web-1"}, "shop/b": {"shop/db-1"}}


EP_SLICE = "n1.endpoints-0"
HELD: dict[str, dict[str, Any]] = {}
"""The endpoint slices specs have listed, by content hash (as the cache holds them)."""


def spec(revision: str, a: str = "a1", b: str = "b1", endpoints: list[dict[str, Any]] = ENDPOINTS) -> dict[str, Any]:
    refs = [{"name": "n1.aaa-0", "contentHash": a}, {"name": "n1.bbb-0", "contentHash": b}]
    if endpoints:
        digest = hashlib.sha256(json.dumps(endpoints, sort_keys=True).encode()).hexdigest()
        HELD[digest] = {"contentHash": digest, "endpoints": endpoints}
        refs.append({"name": EP_SLICE, "contentHash": digest})
    return {"slices": refs, "revision": revision}


def endpoints_of(policy: dict[str, Any] | None) -> Endpoints | None:
    ref = next((r for r in (policy or {}).get("slices") or [] if r["name"] == EP_SLICE), None)
    return listed_endpoints(policy, {EP_SLICE: HELD[ref["contentHash"]]} if ref and ref["contentHash"] in HELD else {})


def move(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[bool, set[str]]:
    return moved(old, new, owners, SELECTED, (endpoints_of(old), endpoints_of(new)))


def record(log: RevisionLog, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    log.record("n1", old, new, owners, SELECTED, (endpoints_of(old), endpoints_of(new)))


def ready_refs(log: RevisionLog, current: str, observed: str) -> set[str]:
    node = NodeEnforcement(
        1, {"enforcing": True, "observedRevision": observed}, revision=current, revisions=log.node("n1")
    )
    return {ref for ref in ("shop/a", "shop/b") if node.enforces(ref)}


def test_moved_names_the_policies_whose_slice_refs_differ() -> None:
    assert move(spec("r1"), spec("r2", b="b2")) == (False, {"shop/b"})
    two_parts = {**spec("r2"), "slices": [*spec("r2")["slices"], {"name": "n1.bbb-1", "contentHash": "x"}]}
    assert move(spec("r1"), two_parts) == (False, {"shop/b"})
    assert move(spec("r1"), {**spec("r2"), "slices": [r for r in spec("r2")["slices"] if r["name"] != "n1.bbb-0"]}) == (
        False,
        {"shop/b"},
    )
    assert move(None, spec("r1")) == (False, {"shop/a", "shop/b"})


def test_an_identitys_address_slice_moves_every_policy_naming_it() -> None:
    addresses = {"name": "n1.id300-0", "contentHash": "c1"}
    before = {**spec("r1"), "slices": [*spec("r1")["slices"], addresses]}
    after = {**spec("r2"), "slices": [*spec("r2")["slices"], {**addresses, "contentHash": "c2"}]}
    assert move(before, after) == (False, {"shop/a", "shop/b"})
    assert move(before, spec("r2")) == (False, {"shop/a", "shop/b"})


def test_an_endpoint_change_moves_the_policies_selecting_it() -> None:
    assert move(spec("r1"), spec("r2", endpoints=[])) == (False, {"shop/a"})
    inline = {**spec("r2", endpoints=[]), "endpoints": [POD]}  # as the operator wrote them before endpoint slices
    assert move(spec("r1"), inline) == (False, set())
    assert move(spec("r1"), spec("r2", endpoints=[POD, OTHER])) == (False, {"shop/b"})
    relabelled = {**POD, "identity": 302}
    assert move(spec("r1"), spec("r2", endpoints=[relabelled])) == (False, {"shop/a"})
    unselected = {**OTHER, "pod": "cache-1"}
    assert move(spec("r1"), spec("r2", endpoints=[POD, unselected])) == (False, set())


def test_endpoints_not_at_hand_count_as_changed() -> None:
    """A listed endpoint slice the cache does not hold at the listed hash (a write that failed half-way):
    every endpoint of the known side concerns its policies, and with neither side known, every policy."""
    unknown = {**spec("r1"), "slices": [*spec("r1", endpoints=[])["slices"], {"name": EP_SLICE, "contentHash": "gone"}]}
    assert endpoints_of(unknown) is None
    assert move(unknown, spec("r2", endpoints=[POD, OTHER])) == (False, {"shop/a", "shop/b"})
    assert move(spec("r1", endpoints=[OTHER]), unknown) == (False, {"shop/b"})
    assert move(unknown, unknown) == (False, {"shop/a", "shop/b"})


def test_the_nodes_addresses_concern_every_policy() -> None:
    hosts = {**spec("r2"), "ipcache": [{"cidr": "192.168.0.1/32", "identity": 1}]}
    assert move(spec("r1"), hosts) == (True, set())


def test_an_edit_of_one_policy_leaves_the_other_enforced() -> None:
    log = RevisionLog()
    record(log, spec("r1"), spec("r2", b="b2"))
    # The daemon still holds r1: a is unchanged since, b waits for r2.
    assert ready_refs(log, "r2", "r1") == {"shop/a"}
    assert ready_refs(log, "r2", "r2") == {"shop/a", "shop/b"}
    record(log, spec("r2", b="b2"), spec("r3", a="a2", b="b2"))
    assert ready_refs(log, "r3", "r1") == set()
    assert ready_refs(log, "r3", "r2") == {"shop/b"}
    assert ready_refs(log, "r3", "unknown") == set()


def test_a_node_wide_change_makes_every_policy_wait() -> None:
    log = RevisionLog()
    record(log, spec("r1"), {**spec("r2"), "ipcache": [{"cidr": "192.168.0.1/32", "identity": 1}]})
    assert ready_refs(log, "r2", "r1") == set()


def test_a_pod_starting_leaves_the_policies_not_selecting_it_ready() -> None:
    log = RevisionLog()
    record(log, spec("r1"), spec("r2", endpoints=[POD, OTHER]))
    assert ready_refs(log, "r2", "r1") == {"shop/a"}
    assert ready_refs(log, "r2", "r2") == {"shop/a", "shop/b"}


def test_a_revision_written_again_counts_as_the_newest() -> None:
    """Revisions are content hashes: holding r1 again means holding today's content."""
    log = RevisionLog()
    record(log, spec("r1"), spec("r2", b="b2"))
    record(log, spec("r2", b="b2"), spec("r1"))
    assert ready_refs(log, "r1", "r2") == {"shop/a"}
    assert ready_refs(log, "r1", "r1") == {"shop/a", "shop/b"}


def test_only_the_last_revisions_are_remembered() -> None:
    log = RevisionLog(keep=3)
    for i in range(1, 6):
        record(log, spec(f"r{i}", b=f"b{i}"), spec(f"r{i + 1}", b=f"b{i + 1}"))
    assert ready_refs(log, "r6", "r4") == {"shop/a"}
    assert ready_refs(log, "r6", "r3") == set()  # forgotten: waits for a newer one, as after a restart
    log.forget("n1")
    assert log.node("n1") is None and ready_refs(log, "r6", "r6") == {"shop/a", "shop/b"}


def test_ready_does_not_dip_for_another_policys_edit() -> None:
    log = RevisionLog()
    record(log, spec("r1"), spec("r2", b="b2"))
    node = {
        "n1": NodeEnforcement(2, {"enforcing": True, "observedRevision": "r1"}, revision="r2", revisions=log.node("n1"))
    }
    a = PolicyOutcome("shop", "a", 1, selected={"shop/pod"}, nodes={"n1"})
    b = PolicyOutcome("shop", "b", 1, selected={"shop/pod"}, nodes={"n1"})
    ready = {
        o.ref: next(c for c in aggregate(o, node, None, NOW)["conditions"] if c["type"] == "Ready") for o in (a, b)
    }
    assert (ready["shop/a"]["status"], ready["shop/b"]["status"]) == ("True", "False")
    assert ready["shop/b"]["message"] == "enforced on 0/1 nodes; waiting for n1"
