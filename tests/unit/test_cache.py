"""The operator's cache: relists replace, own writes wake nothing, ConfigMaps only when referenced."""

from __future__ import annotations

from beekeeper.crds.policyslice import slice_hash
from beekeeper.operator import cache as cache_module
from beekeeper.operator.cache import KINDS, OWN_WRITE_TTL_SECONDS, ClusterCache, OwnWrites, stored
from beekeeper.operator.health import Health


def obj(name: str, version: int, namespace: str | None = None, **extra) -> dict:
    meta = {"name": name, "resourceVersion": str(version), **({"namespace": namespace} if namespace else {})}
    return {"metadata": meta, **extra}


def listed(cache: ClusterCache, **tables: list[dict]) -> ClusterCache:
    for kind in KINDS:
        cache.replace(kind, tables.get(kind, []))
    return cache


def test_a_relist_drops_what_vanished_during_the_gap() -> None:
    cache = listed(ClusterCache(), NetworkIdentityPolicy=[obj("gone", 1, "ns"), obj("kept", 2, "ns")])
    assert cache.primed.is_set()
    cache.take_dirty()
    cache.replace("NetworkIdentityPolicy", [obj("kept", 2, "ns"), obj("new", 5, "ns")])
    assert set(cache.tables["NetworkIdentityPolicy"]) == {"ns/kept", "ns/new"}
    assert cache.take_dirty() == {("NetworkIdentityPolicy", "ns/gone"), ("NetworkIdentityPolicy", "ns/new")}


def test_events_apply_in_version_order() -> None:
    cache = listed(ClusterCache(), Node=[obj("n", 5)])
    cache.take_dirty()
    assert not cache.observe("Node", "MODIFIED", obj("n", 4))  # older than what is known
    assert not cache.observe("Node", "MODIFIED", obj("n", 5))  # the same
    assert cache.observe("Node", "MODIFIED", obj("n", 6))
    assert cache.observe("Node", "DELETED", obj("n", 7)) and "n" not in cache.nodes
    assert not cache.observe("Node", "DELETED", obj("n", 7))


def test_own_writes_wake_nothing_whichever_comes_first() -> None:
    cache = listed(ClusterCache(), BpfNodeState=[obj("a", 1), obj("b", 1)])
    cache.take_dirty()
    cache.observe("BpfNodeState", "MODIFIED", obj("a", 2))  # the event overtook the write's reply
    cache.own.expect("BpfNodeState", "a", "2")
    cache.own.expect("BpfNodeState", "b", "3")
    cache.record_own("BpfNodeState", obj("b", 3))  # the reply came first
    cache.observe("BpfNodeState", "MODIFIED", obj("b", 3))
    cache.observe("BpfNodeState", "MODIFIED", obj("b", 4))  # someone else's change
    assert cache.take_dirty() == {("BpfNodeState", "b")}
    assert cache.nodestates["b"]["metadata"]["resourceVersion"] == "4"


def test_only_referenced_configmaps_are_kept_and_a_new_reference_is_fetched() -> None:
    fetch: list[str] = []
    cache = ClusterCache(on_unknown_configmap=fetch.append)
    listed(cache, ConfigMap=[obj("src", 1, "ns", data={"k": "v"}), obj("other", 1, "ns", data={"x": "y"})])
    assert cache.tables["ConfigMap"] == {} and fetch == []
    program = obj("p", 2, spec={"source": {"configMapRef": {"namespace": "ns", "name": "src", "key": "k"}}})
    cache.observe("BpfProgram", "ADDED", program)
    assert fetch == ["ns/src"] and not cache.primed.is_set()  # no pass decides before it is known
    cache.fetched("ns/src", obj("src", 1, "ns", data={"k": "v"}))
    assert cache.primed.is_set() and cache.snapshot().configmap("ns", "src") == {"k": "v"}
    assert not cache.observe("ConfigMap", "MODIFIED", obj("other", 2, "ns", data={}))
    cache.observe("ConfigMap", "MODIFIED", obj("src", 3, "ns", data={"k": "w"}))
    assert cache.snapshot().configmap("ns", "src") == {"k": "w"}
    cache.observe("BpfProgram", "DELETED", program)
    assert cache.tables["ConfigMap"] == {}


def test_a_configmap_deleted_while_being_fetched_stays_absent() -> None:
    cache = listed(ClusterCache(on_unknown_configmap=lambda key: None))
    ref = obj("p", 2, spec={"source": {"configMapRef": {"namespace": "ns", "name": "src", "key": "k"}}})
    cache.observe("BpfProgram", "ADDED", ref)
    cache.observe("ConfigMap", "DELETED", obj("src", 4, "ns"))
    cache.fetched("ns/src", obj("src", 3, "ns", data={"k": "stale"}))
    assert cache.primed.is_set() and cache.snapshot().configmap("ns", "src") is None


def test_liveness_fails_when_the_loop_stopped_or_no_pass_completes() -> None:
    health = Health(resync_seconds=10, started=100.0, loop_running=True)
    assert health.live(now=125.0)[0]
    assert not health.live(now=131.0)[0]  # 3 resync periods without a completed pass
    health.pass_done()
    assert health.live()[0]
    health.update(loop_running=False)
    healthy, report = health.live()
    assert not healthy and report["problem"] == "the reconcile loop has stopped"
    assert health.ready() == (False, {"primed": False, "passes": 1})


def test_bytecode_configmaps_are_referenced_and_keep_their_binary_data() -> None:
    fetch: list[str] = []
    cache = ClusterCache(on_unknown_configmap=fetch.append)
    listed(cache)
    ref = {"configMapRef": {"namespace": "ns", "name": "objects", "key": "p.o"}}
    cache.observe("BpfProgram", "ADDED", obj("p", 2, spec={"bytecode": ref}))
    assert fetch == ["ns/objects"]
    body = obj("objects", 1, "ns")
    body["binaryData"] = {"p.o": "f0VMRg=="}
    cache.fetched("ns/objects", body)
    snapshot = cache.snapshot()
    assert snapshot.binary_configmap("ns", "objects") == {"p.o": "f0VMRg=="}
    assert snapshot.configmap("ns", "objects") == {}


def test_slices_are_kept_as_hashes_and_a_hand_edit_shows() -> None:
    spec = {"nodeName": "n1", "policy": "shop/a", "rules": [], "ipcache": [{"cidr": "10.0.0.1/32", "identity": 300}]}
    spec["contentHash"] = slice_hash(spec)
    cache = listed(ClusterCache(), BpfPolicySlice=[obj("n1.aaa-0", 1, spec=spec)])
    kept = cache.tables["BpfPolicySlice"]["n1.aaa-0"]
    assert kept["spec"] == {"nodeName": "n1", "policy": "shop/a", "contentHash": spec["contentHash"]}
    assert kept["entriesHash"] == spec["contentHash"] and stored("BpfPolicySlice", kept) == kept
    edited = {**spec, "ipcache": [{"cidr": "10.0.0.2/32", "identity": 300}]}  # contentHash left as it was
    assert cache.observe("BpfPolicySlice", "MODIFIED", obj("n1.aaa-0", 2, spec=edited))
    kept = cache.tables["BpfPolicySlice"]["n1.aaa-0"]
    assert kept["spec"]["contentHash"] == spec["contentHash"] != kept["entriesHash"]


def test_own_writes_whose_events_never_came_are_forgotten_after_the_ttl(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: clock[0])
    own = OwnWrites()
    own.expect("BpfNodeState", "a", "1")
    clock[0] += 100
    own.expect("BpfNodeState", "b", "2")
    clock[0] += 100
    own.expect("BpfNodeState", "a", "1")  # written again: its time is renewed
    clock[0] += OWN_WRITE_TTL_SECONDS - 99  # b is 1 s past the TTL, a is not
    own.expect("BpfNodeState", "c", "3")
    assert own.claim("BpfNodeState", "a", "1") and not own.claim("BpfNodeState", "b", "2")
    assert own.claim("BpfNodeState", "c", "3") and not own.claim("BpfNodeState", "c", "3")


def test_own_slice_writes_are_not_hashed_again() -> None:
    spec = {"nodeName": "n1", "policy": "shop/a", "ipcache": [{"cidr": "10.0.0.1/32", "identity": 300}]}
    spec["contentHash"] = "c" * 64  # what the operator hashed when it built the slice
    assert stored("BpfPolicySlice", obj("s", 1, spec=spec), own=True)["entriesHash"] == "c" * 64
    cache = listed(ClusterCache())
    cache.own.expect("BpfPolicySlice", "s", "2")
    assert cache.own.pending("BpfPolicySlice", "s", "2")
    assert cache.observe("BpfPolicySlice", "ADDED", obj("s", 2, spec=spec))  # the watch echo of that write
    assert cache.tables["BpfPolicySlice"]["s"]["entriesHash"] == "c" * 64
    assert cache.observe("BpfPolicySlice", "MODIFIED", obj("s", 3, spec=spec))  # someone else's write: hashed
    assert cache.tables["BpfPolicySlice"]["s"]["entriesHash"] == slice_hash(spec) != "c" * 64
    assert cache.take_dirty() == {("BpfPolicySlice", "s")} and not cache.own.pending("BpfPolicySlice", "s", "2")


def test_nodes_are_kept_as_labels_uid_and_addresses_and_nothing_keeps_managed_fields() -> None:
    """A real Node's status (images, conditions, capacity) and every object's managedFields are large and
    read by nothing here: the cache holds what placement, slice ownership and the host identity need."""
    managed = [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {"f:images": {}}}}]
    node = obj("n1", 3)
    node["metadata"].update(uid="u1", labels={"zone": "a"}, managedFields=managed)
    addresses = [{"type": "InternalIP", "address": "192.168.0.1"}]
    node["status"] = {"addresses": addresses, "images": [{"names": ["x" * 200]}] * 50, "nodeInfo": {"os": "linux"}}
    kept = stored("Node", node)
    assert kept == {
        "metadata": {"name": "n1", "uid": "u1", "labels": {"zone": "a"}, "resourceVersion": "3"},
        "status": {"addresses": addresses},
    }
    program = obj("p", 2, spec={"source": {"inline": "int f() { return 0; }"}})
    program["metadata"].update(managedFields=managed, finalizers=["beekeeper.dev/detach"])
    kept = stored("BpfProgram", program)
    assert "managedFields" not in kept["metadata"] and kept["metadata"]["finalizers"] == ["beekeeper.dev/detach"]
    assert kept["spec"] == program["spec"] and "managedFields" in program["metadata"]  # the event is left as it was


def test_an_own_write_replaces_its_echo_with_the_spec_the_operator_sent() -> None:
    """The write's watch event often comes before the pass records the write; the entry kept is then
    the operator's own (sharing the compiler's objects), not the event's decoded copy."""
    endpoints = [{"namespace": "ns", "pod": "p", "ip": "10.0.0.1", "identity": 300}]
    sent = {"nodeName": "n1", "endpoints": endpoints, "contentHash": "e" * 64}
    echo = obj("n1.endpoints-0", 2, spec={**sent, "endpoints": [dict(endpoints[0])]})
    echo["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "beekeeper"}
    cache = listed(ClusterCache())
    cache.own.expect("BpfPolicySlice", "n1.endpoints-0", "2")
    cache.observe("BpfPolicySlice", "ADDED", echo)
    assert cache.tables["BpfPolicySlice"]["n1.endpoints-0"]["spec"]["endpoints"] is not endpoints
    cache.record_own("BpfPolicySlice", stored("BpfPolicySlice", obj("n1.endpoints-0", 2, spec=sent), own=True))
    kept = cache.tables["BpfPolicySlice"]["n1.endpoints-0"]
    assert kept["spec"]["endpoints"] is endpoints and kept["entriesHash"] == "e" * 64
    assert kept["metadata"] == {"name": "n1.endpoints-0", "resourceVersion": "2"}  # no labels: nothing reads them
    cache.observe("BpfPolicySlice", "MODIFIED", obj("n1.endpoints-0", 3, spec=sent))  # someone else's write
    cache.record_own("BpfPolicySlice", stored("BpfPolicySlice", obj("n1.endpoints-0", 2, spec=sent), own=True))
    assert cache.tables["BpfPolicySlice"]["n1.endpoints-0"]["metadata"]["resourceVersion"] == "3"
