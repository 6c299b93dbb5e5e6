"""Identity allocation and collection (pure), and how pods map to identity keys."""

from __future__ import annotations

import pytest
from policy_reference import namespace, pod

from beekeeper.crds.identity import MAX_POD_IDENTITY, MIN_POD_IDENTITY, NetworkIdentity
from beekeeper.operator.identities import (
    GC_GRACE_ENV,
    IdentityKey,
    gc_grace_seconds,
    identity_body,
    parse_identities,
    parse_identity,
    plan_identities,
)
from beekeeper.operator.pods import NamedPort, PodRecords, pod_records, slim_pod

FRONTEND = IdentityKey.of("shop", {"app": "frontend"}, {"kubernetes.io/metadata.name": "shop"})
BACKEND = IdentityKey.of("shop", {"app": "backend"}, {"kubernetes.io/metadata.name": "shop"})
GRACE = 60.0


def plan(wanted, existing=None, unused_since=None, now=0.0):
    return plan_identities(wanted, existing or {}, unused_since or {}, now, GRACE)


def test_allocation_is_deterministic_and_order_independent() -> None:
    one = plan([FRONTEND, BACKEND])
    two = plan([BACKEND, FRONTEND, BACKEND])
    assert one.assigned == two.assigned
    assert one.create == {n: k for k, n in one.assigned.items()}
    assert len(set(one.assigned.values())) == 2
    assert all(MIN_POD_IDENTITY <= n <= MAX_POD_IDENTITY for n in one.assigned.values())


def test_persisted_numbers_are_reused_after_restart() -> None:
    first = plan([FRONTEND, BACKEND])
    persisted = dict(first.create)  # what the API holds after the first operator's pass
    restarted = plan([BACKEND, FRONTEND], persisted)
    assert restarted.assigned == first.assigned and restarted.create == {} and restarted.delete == []


def test_existing_numbers_win_over_hash_candidates() -> None:
    assert plan([FRONTEND], {300: FRONTEND}).assigned == {FRONTEND: 300}


def test_label_sets_differ_by_namespace_and_namespace_labels() -> None:
    other_ns = IdentityKey.of("other", {"app": "frontend"}, {"kubernetes.io/metadata.name": "other"})
    relabelled_ns = IdentityKey.of("shop", {"app": "frontend"}, {"kubernetes.io/metadata.name": "shop", "env": "x"})
    assigned = plan([FRONTEND, other_ns, relabelled_ns]).assigned
    assert len(set(assigned.values())) == 3


def test_taken_number_probes_to_the_next_free_one() -> None:
    wanted = next(FRONTEND.candidates())
    result = plan([FRONTEND], {wanted: BACKEND})
    assert result.assigned[FRONTEND] == (wanted + 1 if wanted < MAX_POD_IDENTITY else MIN_POD_IDENTITY)


def test_candidates_wrap_around_the_range() -> None:
    numbers = FRONTEND.candidates()
    first = [next(numbers) for _ in range(3)]
    assert len(set(first)) == 3 and all(MIN_POD_IDENTITY <= n <= MAX_POD_IDENTITY for n in first)


def test_unusable_numbers_are_never_assigned_nor_collected() -> None:
    wanted = next(FRONTEND.candidates())
    result = plan([FRONTEND], {wanted: None}, now=10_000)
    assert result.assigned[FRONTEND] != wanted and result.delete == []


def test_unused_identity_is_collected_after_the_grace_period() -> None:
    first = plan([FRONTEND, BACKEND])
    persisted = dict(first.create)
    backend = first.assigned[BACKEND]

    unused = plan([FRONTEND], persisted, now=100.0)
    assert unused.delete == [] and unused.unused_since == {backend: 100.0} and unused.next_gc == 100.0 + GRACE
    still = plan([FRONTEND], persisted, unused.unused_since, now=100.0 + GRACE - 1)
    assert still.delete == []
    gone = plan([FRONTEND], persisted, still.unused_since, now=100.0 + GRACE)
    assert gone.delete == [backend] and gone.unused_since == {} and gone.next_gc is None


def test_reuse_within_the_grace_period_keeps_the_number() -> None:
    first = plan([FRONTEND, BACKEND])
    persisted = dict(first.create)
    unused = plan([FRONTEND], persisted, now=100.0)
    back = plan([FRONTEND, BACKEND], persisted, unused.unused_since, now=130.0)
    assert back.assigned == first.assigned and back.create == {} and back.unused_since == {}


def test_duplicates_resolve_to_the_lowest_number_and_the_other_is_collected() -> None:
    result = plan([FRONTEND], {900: FRONTEND, 400: FRONTEND}, {900: 0.0}, now=GRACE)
    assert result.assigned == {FRONTEND: 400} and result.delete == [900]


def test_parse_identity_objects() -> None:
    body = identity_body(4242, FRONTEND)
    NetworkIdentity.from_dict(body)  # what the operator creates is a valid object
    assert parse_identity(body) == (4242, FRONTEND)
    deleting = {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert parse_identity(deleting) == (4242, None)
    assert parse_identity({"metadata": {"name": "abc"}}) is None
    assert parse_identity({"metadata": {"name": "12"}}) is None  # reserved range: not ours
    assert parse_identities([body, {"metadata": {"name": "777"}, "spec": {}}]) == {4242: FRONTEND, 777: None}


def test_identity_spec_leaves_out_empty_label_maps() -> None:
    assert IdentityKey.of("ns", {}, None).spec() == {"namespace": "ns"}


def test_gc_grace_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GC_GRACE_ENV, raising=False)
    assert gc_grace_seconds() == 60.0
    monkeypatch.setenv(GC_GRACE_ENV, "1.5")
    assert gc_grace_seconds() == 1.5


# --- pods -------------------------------------------------------------------------------------

NAMESPACES = {"shop": namespace("shop")["metadata"]["labels"]}


def test_pod_key_includes_namespace_labels() -> None:
    (record,) = pod_records([pod("shop", "a", {"app": "frontend"}, ip="10.0.0.1")], NAMESPACES)
    assert record.key == FRONTEND and record.ipv4 == "10.0.0.1" and record.node == "n1"


def test_pods_outside_the_pod_network_have_no_identity() -> None:
    pods = [
        pod("shop", "host", {"app": "x"}, ip="192.168.0.1", spec__hostNetwork=True),
        pod("shop", "done", {"app": "x"}, ip="10.0.0.2", status__phase="Succeeded"),
        pod("shop", "failed", {"app": "x"}, ip="10.0.0.3", status__phase="Failed"),
        pod("unknown-ns", "a", {"app": "x"}, ip="10.0.0.4"),
        pod("shop", "pending", {"app": "x"}),
    ]
    records = pod_records(pods, NAMESPACES)
    assert [r.name for r in records] == ["pending"] and records[0].ips == () and records[0].ipv4 is None


def test_duplicate_address_goes_to_the_live_newest_pod() -> None:
    old = pod("shop", "old", ip="10.0.0.1", metadata__creationTimestamp="2026-01-01T00:00:00Z")
    new = pod("shop", "new", ip="10.0.0.1", metadata__creationTimestamp="2026-01-02T00:00:00Z")
    leaving = pod(
        "shop",
        "leaving",
        ip="10.0.0.1",
        metadata__creationTimestamp="2026-01-03T00:00:00Z",
        metadata__deletionTimestamp="2026-01-03T00:01:00Z",
    )
    owners = {r.name: r.ips for r in pod_records([leaving, old, new], NAMESPACES)}
    assert owners == {"new": ("10.0.0.1",), "old": (), "leaving": ()}


def test_dual_stack_addresses_and_named_ports() -> None:
    body = pod("shop", "a", ports=[("http", "TCP", 8080), ("dns", "UDP", 53)])
    body["status"]["podIPs"] = [{"ip": "fd00::0001"}, {"ip": "10.0.0.9"}]
    body["spec"]["initContainers"] = [
        {"name": "sidecar", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9090}]},
        {"name": "init", "ports": [{"name": "setup", "containerPort": 1}]},
    ]
    (record,) = pod_records([body], NAMESPACES)
    assert record.ips == ("fd00::1", "10.0.0.9") and record.ipv4 == "10.0.0.9"
    assert record.named_ports == {
        NamedPort("http", "TCP", 8080),
        NamedPort("dns", "UDP", 53),
        NamedPort("metrics", "TCP", 9090),
    }
    assert pod_records([slim_pod(body)], NAMESPACES) == [record]  # the cache keeps what is read


def test_the_cached_pod_is_what_pod_records_reads_and_the_same_when_slimmed_again() -> None:
    body = pod("shop", "a", {"app": "web"}, ip="10.0.0.7", spec__hostNetwork=False)
    body["metadata"].update(uid="u1", creationTimestamp="2026-01-03T00:00:00Z", managedFields=[{"manager": "x"}])
    body["status"]["containerStatuses"] = [{"name": "c", "containerID": "containerd://1", "ready": True}]
    kept = slim_pod(body)
    assert kept == {
        "metadata": {
            "name": "a",
            "uid": "u1",
            "resourceVersion": "1",
            "namespace": "shop",
            "creationTimestamp": "2026-01-03T00:00:00Z",
            "labels": {"app": "web"},
        },
        "spec": {"nodeName": "n1"},  # no named ports, not hostNetwork: nothing else is read
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": "10.0.0.7"}],  # podIP is podIPs[0]
            "containerStatuses": [{"name": "c", "containerID": "containerd://1"}],
        },
    }
    assert slim_pod(kept) == kept and pod_records([kept], NAMESPACES) == pod_records([body], NAMESPACES)
    only_pod_ip = pod("shop", "b", ip="10.0.0.8")
    del only_pod_ip["status"]["podIPs"]
    assert slim_pod(only_pod_ip)["status"] == {"phase": "Running", "podIP": "10.0.0.8"}
    assert pod_records([slim_pod(only_pod_ip)], NAMESPACES)[0].ips == ("10.0.0.8",)


def test_pods_of_one_label_set_share_one_identity_key_object() -> None:
    records = PodRecords()
    bodies = [pod("shop", f"p{i}", {"app": "web"}, ip=f"10.0.0.{i + 1}") for i in range(3)]
    first, second, third = records(bodies, NAMESPACES)
    assert first.key is second.key is third.key and first.named_ports is second.named_ports
    assert first.ref == "shop/p0" and first.ipv4 == "10.0.0.1"
