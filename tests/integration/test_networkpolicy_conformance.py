"""NetworkIdentityPolicy conformance: the upstream NetworkPolicy e2e truth-table model, end to end.

Namespaces x, y, z (labelled ns=<x|y|z>, plus the automatic kubernetes.io/metadata.name)
each hold pods a, b and c (labelled pod=<name>), spread over three simulated nodes, each
serving TCP and UDP on ports 80 and 81 (named serve-<port>-<tcp|udp>). A case applies
policies through the API (the operator compiles them, the node daemons enforce them),
then every ordered pod pair is probed on every port and protocol with real connections
and the whole table is compared with the expected one, printed as grids when they differ.

A case is one declarative entry: policies (and pod label changes or deletions) per step,
and the expected table as overrides of "everything allowed", applied in order, e.g.
[deny(to="x/a"), allow(frm="x/b", to="x/a")]. A pod always reaches itself (loopback
never crosses its veth). "{x}" in a policy stands for namespace x's real name and
"{ip[y/b]}" for pod y/b's IP. All cases share one set of pods; between cases every policy
is deleted and the full table is probed back to all-allowed.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from netpol_rig import PodRig, Probe, SimPod, TruthTable, assert_table, percentile, probe, tcx_program_ids
from support import NodeDaemon, NodeDaemons, wait_for

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    GROUP,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
)

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
NODES = 3
SETTLE_SECONDS = 60


# --- the declarative model -----------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    allowed: bool
    frm: str = "*"
    to: str = "*"
    port: int | None = None
    protocol: str | None = None


def allow(frm: str = "*", to: str = "*", port: int | None = None, protocol: str | None = None) -> Expect:
    return Expect(True, frm, to, port, protocol)


def deny(frm: str = "*", to: str = "*", port: int | None = None, protocol: str | None = None) -> Expect:
    return Expect(False, frm, to, port, protocol)


@dataclass(frozen=True)
class Step:
    apply: tuple[dict, ...] = ()
    """Policies to create or update (server-side apply)."""
    delete: tuple[str, ...] = ()
    """Policies to delete, as "<logical namespace>/<name>"."""
    labels: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)
    """Pod key -> labels to merge (None removes one)."""
    expect: tuple[Expect, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Step, ...]


def case(
    name: str, *policies: dict, expect: list[Expect] | tuple[Expect, ...] = (), then: tuple[Step, ...] = ()
) -> Case:
    return Case(name, (Step(apply=policies, expect=tuple(expect)), *then))


def policy(
    ns: str,
    name: str,
    select: dict[str, str] | None = None,
    types: list[str] | None = None,
    **rules: list[dict],
) -> dict:
    """A NetworkIdentityPolicy in logical namespace ns; rules: ingress, egress, ingressDeny, egressDeny."""
    spec: dict[str, Any] = {"podSelector": {"matchLabels": select} if select else {}}
    if types:
        spec["policyTypes"] = types
    spec.update(rules)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": name, "namespace": "{" + ns + "}"},
        "spec": spec,
    }


def pods(**labels: str) -> dict:
    return {"podSelector": {"matchLabels": labels}}


def namespaces(**labels: str) -> dict:
    return {"namespaceSelector": {"matchLabels": labels}}


def port(number: int | str | None = None, protocol: str = "TCP", end: int | None = None) -> dict:
    out: dict[str, Any] = {"protocol": protocol}
    if number is not None:
        out["port"] = number
    if end is not None:
        out["endPort"] = end
    return out


ALL = ["Ingress", "Egress"]
NOT_Y = {"key": "ns", "operator": "NotIn", "values": ["y"]}

CASES = [
    case("default-deny ingress", policy("x", "deny-in", types=["Ingress"]), expect=[deny(to="x/*")]),
    case(
        "default-deny ingress and egress",
        policy("x", "deny-all", types=ALL),
        expect=[deny(to="x/*"), deny(frm="x/*")],
    ),
    case(
        "allow from one pod label in the same namespace",
        policy("x", "from-b", {"pod": "a"}, ingress=[{"from": [pods(pod="b")]}]),
        expect=[deny(to="x/a"), allow(frm="x/b", to="x/a")],
    ),
    case(
        "allow from all namespaces",
        policy("x", "from-all-ns", {"pod": "a"}, ingress=[{"from": [namespaces()]}]),
        expect=[],
    ),
    case(
        "allow only from namespace y (same namespace denied)",
        policy("x", "from-y", ingress=[{"from": [namespaces(ns="y")]}]),
        expect=[deny(to="x/*"), allow(frm="y/*", to="x/*")],
    ),
    case(
        "multiple from entries are a union",
        policy("x", "from-b-or-z", {"pod": "a"}, ingress=[{"from": [pods(pod="b"), namespaces(ns="z")]}]),
        expect=[deny(to="x/a"), allow(frm="x/b", to="x/a"), allow(frm="z/*", to="x/a")],
    ),
    case(
        "a specific pod in another namespace (namespaceSelector AND podSelector)",
        policy(
            "x",
            "from-y-c",
            {"pod": "a"},
            ingress=[{"from": [{**namespaces(**{"kubernetes.io/metadata.name": "{y}"}), **pods(pod="c")}]}],
        ),
        expect=[deny(to="x/a"), allow(frm="y/c", to="x/a")],
    ),
    case(
        "port by number",
        policy("x", "port-81", {"pod": "a"}, ingress=[{"ports": [port(81)]}]),
        expect=[deny(to="x/a"), allow(to="x/a", port=81, protocol="TCP")],
    ),
    case(
        "port range (endPort)",
        policy("x", "range", {"pod": "a"}, ingress=[{"ports": [port(81, "TCP", end=90)]}]),
        expect=[deny(to="x/a"), allow(to="x/a", port=81, protocol="TCP")],
    ),
    case(
        "peer and port in one rule",
        policy("x", "b-udp-80", {"pod": "a"}, ingress=[{"from": [pods(pod="b")], "ports": [port(80, "UDP")]}]),
        expect=[deny(to="x/a"), allow(frm="x/b", to="x/a", port=80, protocol="UDP")],
    ),
    case(
        "allow-all ingress [{}] wins over a default deny (union of policies)",
        policy("x", "deny-in", types=["Ingress"]),
        policy("x", "allow-all", ingress=[{}]),
        expect=[],
    ),
    case(
        "named port ingress",
        policy("x", "named-in", {"pod": "a"}, ingress=[{"ports": [port("serve-81-udp", "UDP")]}]),
        expect=[deny(to="x/a"), allow(to="x/a", port=81, protocol="UDP")],
    ),
    case(
        "egress by named port",
        policy("x", "named-out", {"pod": "a"}, types=["Egress"], egress=[{"ports": [port("serve-80-tcp")]}]),
        expect=[deny(frm="x/a"), allow(frm="x/a", port=80, protocol="TCP")],
    ),
    case(
        "protocol-only rule: TCP allowed, UDP denied",
        policy("x", "tcp-only", {"pod": "a"}, ingress=[{"ports": [{"protocol": "TCP"}]}]),
        expect=[deny(to="x/a"), allow(to="x/a", protocol="TCP")],
    ),
    case(
        "policy updated from allow-all to deny-all",
        policy("x", "changing", ingress=[{}]),
        expect=[],
        then=(Step(apply=(policy("x", "changing", types=["Ingress"]),), expect=(deny(to="x/*"),)),),
    ),
    case(
        "a pod label added makes traffic allowed",
        policy("x", "from-blue", {"pod": "a"}, ingress=[{"from": [pods(team="blue")]}]),
        expect=[deny(to="x/a")],
        then=(Step(labels={"x/b": {"team": "blue"}}, expect=(deny(to="x/a"), allow(frm="x/b", to="x/a"))),),
    ),
    case(
        "egress deny for a namespace",
        policy(
            "x",
            "not-to-y",
            types=["Egress"],
            egress=[{"to": [{"namespaceSelector": {"matchExpressions": [NOT_Y]}}]}],
        ),
        expect=[deny(frm="x/*", to="y/*")],
    ),
    case(
        "egress ipBlock to one pod IP",
        policy("x", "to-y-b", {"pod": "a"}, types=["Egress"], egress=[{"to": [{"ipBlock": {"cidr": "{ip[y/b]}/32"}}]}]),
        expect=[deny(frm="x/a"), allow(frm="x/a", to="y/b")],
    ),
    case(
        "egress ipBlock with except",
        policy(
            "x",
            "all-but-y-b",
            {"pod": "a"},
            types=["Egress"],
            egress=[{"to": [{"ipBlock": {"cidr": "10.240.0.0/16", "except": ["{ip[y/b]}/32"]}}]}],
        ),
        expect=[deny(frm="x/a", to="y/b")],
    ),
    case(
        "client egress and server ingress must both allow",
        policy("x", "a-to-y", {"pod": "a"}, types=["Egress"], egress=[{"to": [namespaces(ns="y")]}]),
        policy("y", "b-from-z", {"pod": "b"}, ingress=[{"from": [namespaces(ns="z")]}]),
        expect=[deny(frm="x/a"), allow(frm="x/a", to="y/*"), deny(to="y/b"), allow(frm="z/*", to="y/b")],
    ),
    case(
        "deleting policies restores full connectivity",
        *(policy(ns, "deny-all", types=ALL) for ns in NAMESPACES),
        expect=[deny()],
        then=(Step(delete=tuple(f"{ns}/deny-all" for ns in NAMESPACES)),),
    ),
    case(
        "deny rules beat allows",
        policy("x", "allow-all", ingress=[{}]),
        policy("x", "deny-from-b", types=["Ingress"], ingressDeny=[{"from": [pods(pod="b")]}]),
        policy(
            "z",
            "no-tcp-81-to-x",
            types=["Egress"],
            egress=[{}],
            egressDeny=[{"to": [namespaces(ns="x")], "ports": [port(81)]}],
        ),
        expect=[deny(frm="x/b", to="x/*"), deny(frm="z/*", to="x/*", port=81, protocol="TCP")],
    ),
]


# --- the world ---------------------------------------------------------------------------------


def resolve(obj: Any, names: Mapping[str, str], ips: Mapping[str, str]) -> Any:
    """Replace "{x}" and "{ip[y/b]}" placeholders in every string of a manifest."""
    if isinstance(obj, dict):
        return {resolve(k, names, ips): resolve(v, names, ips) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, names, ips) for v in obj]
    if isinstance(obj, str) and "{" in obj:
        return obj.format_map({**names, "ip": ips})
    return obj


@dataclass
class World:
    api: client.ApiClient
    custom: client.CustomObjectsApi
    rig: PodRig
    nodes: list[NodeDaemon]
    names: dict[str, str]
    """logical namespace -> real name."""
    program_ids: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def pods(self) -> dict[str, SimPod]:
        return self.rig.pods

    def ips(self) -> dict[str, str]:
        return {key: pod.ip for key, pod in self.pods.items()}

    def expected(self, expects: tuple[Expect, ...]) -> TruthTable:
        table = TruthTable.full(self.pods)
        for e in expects:
            table.set(e.allowed, e.frm, e.to, e.port, e.protocol)
        for key in self.pods:
            table.set(True, frm=key, to=key)
        return table

    def apply(self, manifest: dict) -> dict:
        return kube.apply(self.api, resolve(manifest, self.names, self.ips()))

    def policies(self) -> list[dict]:
        out = []
        for ns in self.names.values():
            out += self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, NETWORK_IDENTITY_POLICY_PLURAL)[
                "items"
            ]
        return out

    def delete_policy(self, ns: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, NETWORK_IDENTITY_POLICY_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def nodestates(self) -> list[dict]:
        """The rig nodes' BpfNodeStates ({"metadata": {"name": node}} for one not created yet)."""
        out = []
        for node in self.nodes:
            try:
                out.append(self.custom.get_cluster_custom_object(GROUP, VERSION, BPF_NODE_STATE_PLURAL, node.node))
            except ApiException as exc:
                if exc.status != 404:
                    raise
                out.append({"metadata": {"name": node.node, "generation": 0}})
        return out

    def unsettled(self, gone: set[str] = frozenset()) -> str | None:
        """Why the control plane and the nodes have not caught up yet (None: they have)."""
        for body in self.policies():
            meta, status = body["metadata"], body.get("status") or {}
            ref = f"{meta['namespace']}/{meta['name']}"
            conditions = {c["type"]: c for c in status.get("conditions") or []}
            if status.get("observedGeneration") != meta["generation"]:
                return f"{ref}: generation {meta['generation']} not observed yet"
            valid = conditions.get("Valid") or {}
            assert valid.get("status") != "False", f"{ref} rejected: {valid.get('message')}"
            if (conditions.get("Ready") or {}).get("status") != "True":
                return f"{ref} not Ready: {(conditions.get('Ready') or {}).get('message')}"
        slices = {
            s["metadata"]["name"]: s["spec"].get("policy")
            for s in self.custom.list_cluster_custom_object(GROUP, VERSION, BPF_POLICY_SLICE_PLURAL)["items"]
        }
        for state in self.nodestates():
            spec = (state.get("spec") or {}).get("networkPolicy") or {}
            stale = {slices.get(r["name"]) for r in spec.get("slices") or []} & gone
            if stale:
                return f"{state['metadata']['name']} still lists slices of {sorted(stale)}"
            report = (state.get("status") or {}).get("networkPolicy") or {}
            synced = report.get("enforcing") and report.get("observedGeneration", 0) >= state["metadata"]["generation"]
            if spec and not synced:
                return f"{state['metadata']['name']} not synced: {report}"
        return None

    def settle(self, gone: set[str] = frozenset()) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        while (why := self.unsettled(gone)) is not None:
            assert time.monotonic() < deadline, f"not settled after {SETTLE_SECONDS}s: {why}"
            time.sleep(0.05)

    def reset(self) -> None:
        """Delete every policy and undo label changes; then the full table must be back."""
        gone = set()
        for body in self.policies():
            meta = body["metadata"]
            self.delete_policy(meta["namespace"], meta["name"])
            gone.add(f"{meta['namespace']}/{meta['name']}")
        for key, pod in self.pods.items():
            base = {"pod": key.split("/")[1]}
            extra = {k: None for k in pod.labels if k not in base}
            if extra:
                self.rig.set_labels(key, extra)
        self.settle(gone)
        assert_table(self.pods, self.expected(()), "full connectivity between cases")


@pytest.fixture(scope="module")
def world(cluster, workdir, operator_process) -> Iterator[World]:
    api = cluster.api()
    core = client.CoreV1Api(api)
    tag = uuid.uuid4().hex[:5]
    names = {ns: f"{ns}-{tag}" for ns in NAMESPACES}
    daemons = NodeDaemons(cluster, workdir)
    rig = PodRig(api)
    ok = False
    try:
        nodes = [daemons() for _ in range(NODES)]
        for ns, real in names.items():
            core.create_namespace({"metadata": {"name": real, "labels": {"ns": ns}}})
        for i, (ns, name) in enumerate((ns, name) for ns in NAMESPACES for name in POD_NAMES):
            rig.add(f"{ns}/{name}", names[ns], name, nodes[i % NODES].node, {"pod": name})
        rig.wait_servers()
        # Nodes run the policy datapath only while some valid policy exists. One that selects
        # no pod, outside the table's namespaces, keeps it attached through every case, so the
        # program-id check at the end sees whether edits ever replaced a pod's programs.
        core.create_namespace({"metadata": {"name": f"anchor-{tag}"}})
        anchor = policy("anchor", "selects-nothing", {"beekeeper.dev/no-pod": "x"})
        anchor["metadata"]["namespace"] = f"anchor-{tag}"
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, f"anchor-{tag}", NETWORK_IDENTITY_POLICY_PLURAL, anchor
        )
        w = World(api, client.CustomObjectsApi(api), rig, nodes, names)
        wait_for(
            lambda: all(
                ((s.get("status") or {}).get("networkPolicy") or {}).get("attached") == len(POD_NAMES)
                for s in w.nodestates()
            ),
            60,
            "every node enforcing its 3 pods",
        )
        w.settle()
        assert_table(w.pods, w.expected(()), "full connectivity without policies")
        w.program_ids = {key: tcx_program_ids(pod.host_if) for key, pod in w.pods.items()}
        yield w
        ok = True
    finally:
        rig.close()
        for real in [*names.values(), f"anchor-{tag}"]:
            with contextlib.suppress(ApiException):
                core.delete_namespace(real, propagation_policy="Background")
        daemons.stop_all(show_logs=not ok)


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_truth_table(world: World, case: Case) -> None:
    try:
        for number, step in enumerate(case.steps, start=1):
            for manifest in step.apply:
                world.apply(manifest)
            gone = set()
            for ref in step.delete:
                ns, name = ref.split("/")
                world.delete_policy(world.names[ns], name)
                gone.add(f"{world.names[ns]}/{name}")
            for key, labels in step.labels.items():
                world.rig.set_labels(key, labels)
            world.settle(gone)
            assert_table(world.pods, world.expected(step.expect), f"{case.name}, step {number}")
    finally:
        world.reset()


def test_apply_to_enforced_latency_and_program_ids(world: World) -> None:
    """Repeated edits of one policy through the whole path (API -> operator -> daemons -> kernel).

    Prints p50/p99 of write -> traffic follows and write -> policy Ready; then checks that
    no kernel program was replaced on any pod interface across every case of this module.
    """
    flip = Probe("x/b", "x/a", 80, "TCP")
    to_traffic: list[float] = []
    to_ready: list[float] = []
    try:
        for i in range(20):
            allowed = i % 2 == 1
            rules = [{"from": [pods(pod="b")]}] if allowed else []
            started = time.monotonic()
            body = world.apply(policy("x", "latency", {"pod": "a"}, types=["Ingress"], ingress=rules))
            while probe(world.pods, [flip], 0.02)[flip] is not allowed:
                assert time.monotonic() - started < 30, f"edit {i}: traffic did not follow"
            to_traffic.append(time.monotonic() - started)
            generation = body["metadata"]["generation"]

            def ready(generation: int = generation) -> bool:
                status = (
                    world.custom.get_namespaced_custom_object(
                        GROUP, VERSION, world.names["x"], NETWORK_IDENTITY_POLICY_PLURAL, "latency"
                    ).get("status")
                    or {}
                )
                conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
                return status.get("observedGeneration") == generation and conditions.get("Ready") == "True"

            wait_for(ready, 30, f"edit {i}: Ready", interval=0.01)
            to_ready.append(time.monotonic() - started)
    finally:
        world.reset()
    print(
        f"\napply->enforced through the operator over {len(to_traffic)} edits: write -> traffic follows "
        f"p50 {percentile(to_traffic, 0.5) * 1000:.0f} ms, p99 {percentile(to_traffic, 0.99) * 1000:.0f} ms; "
        f"write -> policy Ready p50 {percentile(to_ready, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(to_ready, 0.99) * 1000:.0f} ms"
    )
    after = {key: tcx_program_ids(pod.host_if) for key, pod in world.pods.items()}
    assert after == world.program_ids, "a policy, label or pod change replaced kernel programs"
