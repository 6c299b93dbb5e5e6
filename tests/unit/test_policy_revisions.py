"""A policy's Ready on a node follows the revisions that moved its own part, not every revision."""

from __future__ import annotations

from typing import Any

from beekeeper.operator.policy_compile import PolicyOutcome
from beekeeper.operator.policy_revisions import RevisionLog, moved
from beekeeper.operator.policy_status import NodeEnforcement, aggregate

NOW = "2026-12-03T10:00:00Z"
OWNER_OF = {"n1.aaa-0": {"shop/a"}, "n1.bbb-0": {"shop/b"}, "n1.bbb-1": {"shop/b"}, "n1.id300-0": {"shop/a", "shop/b"}}


def owners(name: str) -> set[str]:
    return OWNER_OF.get(name, set())


POD = {"namespace": "shop", "pod": "web-1", "ip": "10.0.0.1", "identity": 300, "ingressEnforced": True}
OTHER = {"namespace": "shop", "pod": "db-1", "ip": "10.0.0.2", "identity": 301, "ingressEnforced": False}
ENDPOINTS = [POD]
SELECTED = {"shop/a": {"shop/web-1"}, "shop/b": {"shop/db-1"}}


def spec(revision: str, a: str = "a1", b: str = "b1", endpoints: list[dict[str, Any]] = ENDPOINTS) -> dict[str, Any]:
    return {
        "endpoints": endpoints,
        "slices": [{"name": "n1.aaa-0", "contentHash": a}, {"name": "n1.bbb-0", "contentHash": b}],
        "revision": revision,
    }


def ready_refs(log: RevisionLog, current: str, observed: str) -> set[str]:
    node = NodeEnforcement(
        1, {"enforcing": True, "observedRevision": observed}, revision=current, revisions=log.node("n1")
    )
    return {ref for ref in ("shop/a", "shop/b") if node.enforces(ref)}


def test_moved_names_the_policies_whose_slice_refs_differ() -> None:
    assert moved(spec("r1"), spec("r2", b="b2"), owners, SELECTED) == (False, {"shop/b"})
    two_parts = {**spec("r2"), "slices": [*spec("r2")["slices"], {"name": "n1.bbb-1", "contentHash": "x"}]}
    assert moved(spec("r1"), two_parts, owners, SELECTED) == (False, {"shop/b"})
    assert moved(spec("r1"), {**spec("r2"), "slices": spec("r2")["slices"][:1]}, owners, SELECTED) == (
        False,
        {"shop/b"},
    )
    assert moved(None, spec("r1"), owners, SELECTED) == (False, {"shop/a", "shop/b"})


def test_an_identitys_address_slice_moves_every_policy_naming_it() -> None:
    addresses = {"name": "n1.id300-0", "contentHash": "c1"}
    before = {**spec("r1"), "slices": [*spec("r1")["slices"], addresses]}
    after = {**spec("r2"), "slices": [*spec("r2")["slices"], {**addresses, "contentHash": "c2"}]}
    assert moved(before, after, owners, SELECTED) == (False, {"shop/a", "shop/b"})
    assert moved(before, spec("r2"), owners, SELECTED) == (False, {"shop/a", "shop/b"})


def test_an_endpoint_change_moves_the_policies_selecting_it() -> None:
    assert moved(spec("r1"), spec("r2", endpoints=[]), owners, SELECTED) == (False, {"shop/a"})
    absent = {k: v for k, v in spec("r2").items() if k != "endpoints"}
    assert moved(spec("r1"), absent, owners, SELECTED) == (False, {"shop/a"})
    assert moved(spec("r1"), spec("r2", endpoints=[POD, OTHER]), owners, SELECTED) == (False, {"shop/b"})
    relabelled = {**POD, "identity": 302}
    assert moved(spec("r1"), spec("r2", endpoints=[relabelled]), owners, SELECTED) == (False, {"shop/a"})
    unselected = {**OTHER, "pod": "cache-1"}
    assert moved(spec("r1"), spec("r2", endpoints=[POD, unselected]), owners, SELECTED) == (False, set())


def test_the_nodes_addresses_concern_every_policy() -> None:
    hosts = {**spec("r2"), "ipcache": [{"cidr": "192.168.0.1/32", "identity": 1}]}
    assert moved(spec("r1"), hosts, owners, SELECTED) == (True, set())


def test_an_edit_of_one_policy_leaves_the_other_enforced() -> None:
    log = RevisionLog()
    log.record("n1", spec("r1"), spec("r2", b="b2"), owners, SELECTED)
    # The daemon still holds r1: a is unchanged since, b waits for r2.
    assert ready_refs(log, "r2", "r1") == {"shop/a"}
    assert ready_refs(log, "r2", "r2") == {"shop/a", "shop/b"}
    log.record("n1", spec("r2", b="b2"), spec("r3", a="a2", b="b2"), owners, SELECTED)
    assert ready_refs(log, "r3", "r1") == set()
    assert ready_refs(log, "r3", "r2") == {"shop/b"}
    assert ready_refs(log, "r3", "unknown") == set()


def test_a_node_wide_change_makes_every_policy_wait() -> None:
    log = RevisionLog()
    log.record(
        "n1", spec("r1"), {**spec("r2"), "ipcache": [{"cidr": "192.168.0.1/32", "identity": 1}]}, owners, SELECTED
    )
    assert ready_refs(log, "r2", "r1") == set()


def test_a_pod_starting_leaves_the_policies_not_selecting_it_ready() -> None:
    log = RevisionLog()
    log.record("n1", spec("r1"), spec("r2", endpoints=[POD, OTHER]), owners, SELECTED)
    assert ready_refs(log, "r2", "r1") == {"shop/a"}
    assert ready_refs(log, "r2", "r2") == {"shop/a", "shop/b"}


def test_a_revision_written_again_counts_as_the_newest() -> None:
    """Revisions are content hashes: holding r1 again means holding today's content."""
    log = RevisionLog()
    log.record("n1", spec("r1"), spec("r2", b="b2"), owners, SELECTED)
    log.record("n1", spec("r2", b="b2"), spec("r1"), owners, SELECTED)
    assert ready_refs(log, "r1", "r2") == {"shop/a"}
    assert ready_refs(log, "r1", "r1") == {"shop/a", "shop/b"}


def test_only_the_last_revisions_are_remembered() -> None:
    log = RevisionLog(keep=3)
    for i in range(1, 6):
        log.record("n1", spec(f"r{i}", b=f"b{i}"), spec(f"r{i + 1}", b=f"b{i + 1}"), owners, SELECTED)
    assert ready_refs(log, "r6", "r4") == {"shop/a"}
    assert ready_refs(log, "r6", "r3") == set()  # forgotten: waits for a newer one, as after a restart
    log.forget("n1")
    assert log.node("n1") is None and ready_refs(log, "r6", "r6") == {"shop/a", "shop/b"}


def test_ready_does_not_dip_for_another_policys_edit() -> None:
    log = RevisionLog()
    log.record("n1", spec("r1"), spec("r2", b="b2"), owners, SELECTED)
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
