"""The API models and their pydantic validators, without a cluster."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from beekeeper.crds import names
from beekeeper.crds.bpfprogram import (
    ATTACH_FIELD_NAMES,
    ATTACH_FIELDS,
    XDP_DEFAULT_PRIORITY,
    BpfProgram,
    BpfProgramSpec,
    Metric,
    Program,
    ProgramType,
    Source,
    XdpMode,
)
from beekeeper.crds.common import (
    Condition,
    ConditionStatus,
    LabelSelector,
    check_label_key,
    find_condition,
    set_condition,
)
from beekeeper.crds.networkpolicy import (
    IPBlock,
    NetworkIdentityPolicy,
    NetworkIdentityPolicySpec,
    Peer,
    PolicyPort,
    PolicyType,
    Protocol,
)
from beekeeper.crds.nodestate import BpfNodeState, NodeProgram, PolicyRule, content_hash
from beekeeper.crds.resources import BY_KIND, RESOURCES, parse_resource

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# A complete, valid program entry per type (attach fields exactly as required).
VALID_PROGRAMS: dict[ProgramType, dict[str, Any]] = {
    ProgramType.XDP: {"interfaceSelector": {"interfaces": ["eth0"]}},
    ProgramType.TC: {"interfaceSelector": {"pattern": "veth*"}, "direction": "ingress"},
    ProgramType.TRACEPOINT: {"tracepoint": "raw_syscalls:sys_enter"},
    ProgramType.RAW_TRACEPOINT: {"tracepoint": "sys_enter"},
    ProgramType.UPROBE: {"binary": "/usr/lib/libc.so.6", "symbol": "malloc"},
    ProgramType.URETPROBE: {"binary": "/bin/bash", "symbol": "readline"},
    ProgramType.KPROBE: {"symbol": "tcp_v4_connect"},
    ProgramType.KRETPROBE: {"symbol": "tcp_v4_connect"},
    ProgramType.CGROUP_SKB: {"cgroupPath": "/sys/fs/cgroup/kubepods.slice", "direction": "egress"},
    ProgramType.CGROUP_SOCK_ADDR: {"cgroupPath": "/sys/fs/cgroup", "attachType": "connect4"},
    ProgramType.FENTRY: {"function": "do_unlinkat"},
    ProgramType.FEXIT: {"function": "do_unlinkat"},
    ProgramType.LSM: {"hook": "file_open"},
}
# A valid value for every attach field, to try each on every type.
ATTACH_VALUES: dict[str, Any] = {
    "interfaceSelector": {"interfaces": ["eth0"]},
    "direction": "ingress",
    "xdpMode": "generic",
    "priority": 5,
    "tracepoint": "sched:sched_switch",
    "binary": "/bin/true",
    "symbol": "main",
    "offset": 4,
    "pid": 1,
    "cgroupPath": "/sys/fs/cgroup",
    "attachType": "bind6",
    "function": "vfs_read",
    "hook": "bprm_check_security",
}


def program(type_: ProgramType, **extra: Any) -> dict[str, Any]:
    return {"name": "fn", "type": type_.value, **VALID_PROGRAMS[type_], **extra}


def bpfprogram(**spec: Any) -> dict[str, Any]:
    base = {
        "source": {"inline": "int fn(void *ctx) { return 0; }"},
        "programs": [program(ProgramType.TRACEPOINT)],
    }
    return {"apiVersion": names.API_VERSION, "kind": "BpfProgram", "metadata": {"name": "p"}, "spec": base | spec}


def errors(exc: ValidationError) -> str:
    return str(exc)


# --------------------------------------------------------------------------------------
# Examples and round trips
# --------------------------------------------------------------------------------------


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def test_there_are_examples() -> None:
    kinds = {doc["kind"] for _, doc in example_documents()}
    assert {"BpfProgram", "NetworkIdentityPolicy"} <= kinds


@pytest.mark.parametrize(("name", "doc"), example_documents(), ids=[n for n, _ in example_documents()])
def test_examples_are_valid_and_round_trip(name: str, doc: dict[str, Any]) -> None:
    resource = parse_resource(doc)
    assert resource.to_dict() == doc, "an example uses a default or a spelling the model rewrites"


def test_parse_resource_rejects_foreign_objects() -> None:
    with pytest.raises(ValueError, match="apiVersion"):
        parse_resource({"apiVersion": "v1", "kind": "Pod"})
    with pytest.raises(ValueError, match="kind"):
        parse_resource({"apiVersion": names.API_VERSION, "kind": "Nope"})


def test_resource_names() -> None:
    assert names.GROUP == "beekeeper.dev"
    assert names.VERSION == "v1alpha1"
    assert names.API_VERSION == "beekeeper.dev/v1alpha1"
    assert names.BPF_PROGRAM.crd_name == "bpfprograms.beekeeper.dev"
    assert names.BPF_PROGRAM.short_names == ("bpfprog", "bpfp")
    assert names.NETWORK_IDENTITY_POLICY.short_names == ("nip",)
    assert names.BPF_NODE_STATE.short_names == ("bns",)
    assert names.NETWORK_IDENTITY_POLICY.namespaced
    assert not names.BPF_PROGRAM.namespaced and not names.BPF_NODE_STATE.namespaced
    assert set(BY_KIND) == {
        "BpfProgram",
        "NetworkIdentityPolicy",
        "BpfNodeState",
        "NetworkIdentity",
        "BpfPolicySlice",
        "RuntimeSecurityPolicy",
    }
    assert all(r.names.kind == r.model_fields["kind"].default for r in RESOURCES)


def test_wire_names_are_camel_case_and_python_names_snake_case() -> None:
    spec = BpfProgramSpec(
        node_selector=LabelSelector(match_labels={"kubernetes.io/os": "linux"}),
        source=Source(inline="int f(void *c) { return 0; }"),
        programs=[Program(name="f", type=ProgramType.XDP, interface_selector={"pattern": "eth*"}, xdp_mode="generic")],
    )
    wire = spec.to_dict()
    assert wire["nodeSelector"] == {"matchLabels": {"kubernetes.io/os": "linux"}}
    assert wire["programs"][0] == {
        "name": "f",
        "type": "xdp",
        "interfaceSelector": {"pattern": "eth*"},
        "xdpMode": "generic",
    }
    assert BpfProgramSpec.model_validate(wire) == spec


def test_unknown_fields_are_rejected() -> None:
    doc = bpfprogram()
    doc["spec"]["programs"][0]["tracepiont"] = "x:y"
    with pytest.raises(ValidationError, match="tracepiont"):
        BpfProgram.model_validate(doc)


def test_metadata_keeps_apiserver_fields() -> None:
    doc = bpfprogram()
    doc["metadata"] |= {"uid": "u-1", "generation": 3, "managedFields": [{"manager": "kubectl"}]}
    resource = BpfProgram.model_validate(doc)
    assert resource.metadata.generation == 3
    assert resource.to_dict()["metadata"]["managedFields"] == [{"manager": "kubectl"}]


# --------------------------------------------------------------------------------------
# BpfProgram
# --------------------------------------------------------------------------------------


def test_attach_table_covers_every_type_and_field() -> None:
    assert set(ATTACH_FIELDS) == set(ProgramType)
    wire_fields = {f.alias or n for n, f in Program.model_fields.items()}
    assert set(ATTACH_FIELD_NAMES) == wire_fields - {"name", "type"}
    for required, optional in ATTACH_FIELDS.values():
        assert not required & optional
        assert required | optional <= set(ATTACH_FIELD_NAMES)
    assert set(VALID_PROGRAMS) == set(ProgramType)


@pytest.mark.parametrize("type_", list(ProgramType), ids=str)
def test_valid_program_per_type(type_: ProgramType) -> None:
    Program.model_validate(program(type_))


@pytest.mark.parametrize(
    ("type_", "field"),
    [(t, f) for t, (required, _) in ATTACH_FIELDS.items() for f in sorted(required)],
    ids=lambda v: str(v),
)
def test_program_missing_required_attach_field(type_: ProgramType, field: str) -> None:
    doc = program(type_)
    del doc[field]
    with pytest.raises(ValidationError, match=f"{field} is required for .*{type_.value}"):
        Program.model_validate(doc)


@pytest.mark.parametrize(
    ("type_", "field"),
    [(t, f) for t, (req, opt) in ATTACH_FIELDS.items() for f in ATTACH_FIELD_NAMES if f not in req | opt],
    ids=lambda v: str(v),
)
def test_program_rejects_fields_of_other_types(type_: ProgramType, field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} is only valid for"):
        Program.model_validate(program(type_, **{field: ATTACH_VALUES[field]}))


@pytest.mark.parametrize(
    ("type_", "field"),
    [(t, f) for t, (_, opt) in ATTACH_FIELDS.items() for f in sorted(opt)],
    ids=lambda v: str(v),
)
def test_program_accepts_optional_fields_of_its_type(type_: ProgramType, field: str) -> None:
    Program.model_validate(program(type_, **{field: ATTACH_VALUES[field]}))


@pytest.mark.parametrize(
    ("type_", "tracepoint"),
    [(ProgramType.TRACEPOINT, "sys_enter"), (ProgramType.RAW_TRACEPOINT, "raw_syscalls:sys_enter")],
)
def test_tracepoint_format_depends_on_type(type_: ProgramType, tracepoint: str) -> None:
    with pytest.raises(ValidationError, match="tracepoint"):
        Program.model_validate(program(type_, tracepoint=tracepoint))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": "1bad"}, "name"),
        ({"name": "has-dash"}, "name"),
        ({"type": "socket_filter"}, "type"),
        ({"binary": "relative/path"}, "binary"),
        ({"binary": "/usr/../etc/passwd"}, "'..'"),
        ({"pid": 0}, "pid"),
        ({"symbol": "has space"}, "symbol"),
    ],
)
def test_program_field_syntax(changes: dict[str, Any], match: str) -> None:
    doc = program(ProgramType.UPROBE) | changes
    with pytest.raises(ValidationError, match=match):
        Program.model_validate(doc)


def test_tc_priority_bounds() -> None:
    Program.model_validate(program(ProgramType.TC, priority=1000))
    for bad in (0, 1001):
        with pytest.raises(ValidationError, match="priority"):
            Program.model_validate(program(ProgramType.TC, priority=bad))


def test_interface_selector_needs_something() -> None:
    with pytest.raises(ValidationError, match="interfaces or pattern"):
        Program.model_validate(program(ProgramType.XDP, interfaceSelector={}))
    with pytest.raises(ValidationError, match="interfaces"):
        Program.model_validate(program(ProgramType.XDP, interfaceSelector={"interfaces": []}))
    with pytest.raises(ValidationError, match="interfaces"):
        Program.model_validate(program(ProgramType.XDP, interfaceSelector={"interfaces": ["name-longer-than-15"]}))


def test_program_effective_defaults() -> None:
    xdp = Program.model_validate(program(ProgramType.XDP))
    assert xdp.effective_xdp_mode is XdpMode.NATIVE
    assert "xdpMode" not in xdp.to_dict(), "no server-side default: it would be forbidden on other types"
    tc = Program.model_validate(program(ProgramType.TC))
    assert tc.effective_priority == 1
    assert xdp.effective_priority == XDP_DEFAULT_PRIORITY == 50, "libxdp's default run priority"
    assert Program.model_validate(program(ProgramType.XDP, priority=7)).effective_priority == 7


@pytest.mark.parametrize(
    "source",
    [{}, {"inline": "x", "configMapRef": {"namespace": "ns", "name": "cm", "key": "prog.c"}}],
    ids=["neither", "both"],
)
def test_source_needs_exactly_one(source: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of inline or configMapRef"):
        Source.model_validate(source)


def test_source_from_configmap() -> None:
    src = Source.model_validate({"configMapRef": {"namespace": "kube-system", "name": "progs", "key": "count.c"}})
    assert src.config_map_ref is not None and src.config_map_ref.key == "count.c"


def test_program_names_are_unique() -> None:
    doc = bpfprogram(programs=[program(ProgramType.TRACEPOINT), program(ProgramType.KPROBE)])
    with pytest.raises(ValidationError, match="duplicate program name 'fn'"):
        BpfProgram.model_validate(doc)


def test_programs_bounds() -> None:
    with pytest.raises(ValidationError, match="programs"):
        BpfProgram.model_validate(bpfprogram(programs=[]))
    many = [program(ProgramType.TRACEPOINT, name=f"fn{i}") for i in range(65)]
    with pytest.raises(ValidationError, match="programs"):
        BpfProgram.model_validate(bpfprogram(programs=many))


def test_cflags_must_be_flags() -> None:
    BpfProgram.model_validate(bpfprogram(cflags=["-DMAX=10", "-Wno-unused"]))
    with pytest.raises(ValidationError, match="cflags"):
        BpfProgram.model_validate(bpfprogram(cflags=["MAX=10"]))


def metric(**changes: Any) -> dict[str, Any]:
    return {"map": "counts", "name": "things_total", "type": "counter", "key": {"kind": "int", "label": "id"}} | changes


@pytest.mark.parametrize(
    "key",
    [
        {"kind": "int", "label": "cpu"},
        {"kind": "ipv4", "label": "address"},
        {"kind": "string", "label": "comm"},
        {"kind": "struct", "fields": [{"name": "pid", "type": "u32", "label": "pid"}]},
        {
            "kind": "struct",
            "fields": [
                {"name": "comm", "type": "string", "size": 16, "label": "comm"},
                {"name": "saddr", "type": "ipv4", "label": "source"},
            ],
        },
    ],
    ids=["int", "ipv4", "string", "struct", "struct-string"],
)
def test_valid_metric_keys(key: dict[str, Any]) -> None:
    Metric.model_validate(metric(key=key))


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ({"kind": "struct"}, "struct keys need fields"),
        (
            {"kind": "struct", "label": "x", "fields": [{"name": "a", "type": "u8", "label": "a"}]},
            "not valid for struct",
        ),
        ({"kind": "int"}, "need label"),
        ({"kind": "int", "label": "a", "fields": [{"name": "a", "type": "u8", "label": "a"}]}, "only valid for struct"),
        ({"kind": "struct", "fields": [{"name": "a", "type": "u32", "size": 4, "label": "a"}]}, "size is only valid"),
        (
            {
                "kind": "struct",
                "fields": [{"name": "a", "type": "u8", "label": "x"}, {"name": "b", "type": "u8", "label": "x"}],
            },
            "duplicate label",
        ),
        ({"kind": "int", "label": "__reserved"}, "label"),
        ({"kind": "float", "label": "x"}, "kind"),
    ],
)
def test_invalid_metric_keys(key: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Metric.model_validate(metric(key=key))


@pytest.mark.parametrize("name", ["9lives", "with-dash", "has space", ""])
def test_metric_name_syntax(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        Metric.model_validate(metric(name=name))


def test_metric_map_alias() -> None:
    m = Metric.model_validate(metric())
    assert m.map_name == "counts"
    assert m.to_dict()["map"] == "counts"


def test_metric_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="duplicate metric name"):
        BpfProgram.model_validate(bpfprogram(metrics=[metric(), metric(map="other")]))


# --------------------------------------------------------------------------------------
# Label selectors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["app", "app.kubernetes.io/name", "a", "A_b.c-d", "example.com/x", "node-role.kubernetes.io/control-plane"],
)
def test_valid_label_keys(key: str) -> None:
    assert check_label_key(key) == key
    LabelSelector.model_validate({"matchLabels": {key: "v"}})


@pytest.mark.parametrize(
    "key",
    ["", "-app", "app-", "has space", "a/b/c", "Upper.Case/x", "/name", "x" * 64, ("a" * 63 + ".") * 4 + "/n"],
    ids=[
        "empty",
        "leading-dash",
        "trailing-dash",
        "space",
        "two-slashes",
        "upper-prefix",
        "empty-prefix",
        "long-name",
        "long-prefix",
    ],
)
def test_invalid_label_keys(key: str) -> None:
    with pytest.raises(ValueError, match="invalid label key"):
        check_label_key(key)
    with pytest.raises(ValidationError):
        LabelSelector.model_validate({"matchLabels": {key: "v"}})


@pytest.mark.parametrize("value", ["-x", "x-", "a b", "x" * 64])
def test_invalid_label_values(value: str) -> None:
    with pytest.raises(ValidationError):
        LabelSelector.model_validate({"matchLabels": {"app": value}})


def test_empty_label_value_is_valid() -> None:
    LabelSelector.model_validate({"matchLabels": {"app": ""}})


@pytest.mark.parametrize(
    ("requirement", "match"),
    [
        ({"key": "a", "operator": "In"}, "non-empty"),
        ({"key": "a", "operator": "NotIn", "values": []}, "non-empty"),
        ({"key": "a", "operator": "Exists", "values": ["x"]}, "must be empty"),
        ({"key": "a", "operator": "DoesNotExist", "values": ["x"]}, "must be empty"),
        ({"key": "a", "operator": "Equals", "values": ["x"]}, "operator"),
    ],
)
def test_invalid_requirements(requirement: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        LabelSelector.model_validate({"matchExpressions": [requirement]})


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {}, True),
        ({}, {"any": "thing"}, True),
        ({"matchLabels": {"app": "web"}}, {"app": "web", "x": "y"}, True),
        ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}, {"tier": "b"}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {"tier": "a"}, False),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": ""}, False),
        (
            {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
            {"app": "web"},
            False,
        ),
    ],
)
def test_selector_matching(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is expected


# --------------------------------------------------------------------------------------
# Conditions and time
# --------------------------------------------------------------------------------------


def condition(status: str, at: datetime, reason: str = "Because") -> Condition:
    return Condition(type="Ready", status=status, reason=reason, message="", last_transition_time=at)


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    t1 = t0 + timedelta(minutes=5)
    conditions = set_condition([], condition("True", t0))
    conditions = set_condition(conditions, condition("True", t1, reason="StillFine"))
    ready = find_condition(conditions, "Ready")
    assert ready is not None and ready.last_transition_time == t0 and ready.reason == "StillFine"
    conditions = set_condition(conditions, condition("False", t1))
    ready = find_condition(conditions, "Ready")
    assert ready is not None and ready.last_transition_time == t1 and ready.status is ConditionStatus.FALSE
    assert len(conditions) == 1


def test_condition_wire_format() -> None:
    cond = condition("True", datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC))
    assert cond.to_dict() == {
        "type": "Ready",
        "status": "True",
        "reason": "Because",
        "message": "",
        "lastTransitionTime": "2024-05-06T07:08:09Z",
    }
    assert Condition.model_validate(cond.to_dict()).last_transition_time.tzinfo is not None


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"status": "Yes"}, "status"), ({"reason": "not camel"}, "reason"), ({"reason": ""}, "reason")],
)
def test_condition_syntax(changes: dict[str, Any], match: str) -> None:
    doc = condition("True", datetime(2024, 1, 1, tzinfo=UTC)).to_dict() | changes
    with pytest.raises(ValidationError, match=match):
        Condition.model_validate(doc)


# --------------------------------------------------------------------------------------
# NetworkIdentityPolicy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [1, 80, 65535, "http", "h2c", "grpc-web", "x1"])
def test_valid_ports(port: int | str) -> None:
    assert PolicyPort.model_validate({"port": port}).port == port


@pytest.mark.parametrize(
    "port", [0, 65536, -1, "", "HTTP", "1234", "-http", "http-", "ht--tp", "sixteen-chars-xx", True, 80.0]
)
def test_invalid_ports(port: Any) -> None:
    with pytest.raises(ValidationError, match="port"):
        PolicyPort.model_validate({"port": port})


def test_port_protocol_defaults_to_tcp() -> None:
    assert PolicyPort.model_validate({"port": 53}).protocol is Protocol.TCP
    with pytest.raises(ValidationError, match="protocol"):
        PolicyPort.model_validate({"port": 53, "protocol": "ICMP"})


@pytest.mark.parametrize(
    ("port", "match"),
    [
        ({"endPort": 90}, "endPort requires port"),
        ({"port": "http", "endPort": 90}, "numeric port"),
        ({"port": 100, "endPort": 90}, "greater than or equal"),
        ({"port": 100, "endPort": 65536}, "endPort"),
    ],
)
def test_invalid_port_ranges(port: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PolicyPort.model_validate(port)


def test_port_range() -> None:
    assert PolicyPort.model_validate({"port": 100, "endPort": 100}).end_port == 100


@pytest.mark.parametrize(
    "block",
    [
        {"cidr": "10.0.0.0/8"},
        {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.4/32"]},
        {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]},
        {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]},
        {"cidr": "10.1.2.3/24"},
    ],
)
def test_valid_ip_blocks(block: dict[str, Any]) -> None:
    IPBlock.model_validate(block)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"cidr": "10.0.0.0"}, "not a CIDR"),
        ({"cidr": "10.0.0.0/33"}, "not a CIDR"),
        ({"cidr": "10.0.0.256/8"}, "not a CIDR"),
        ({"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}, "strict subset"),
        ({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}, "strict subset"),
        ({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/7"]}, "strict subset"),
        ({"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}, "strict subset"),
        ({"cidr": "10.0.0.0/8", "except": ["bogus"]}, "not a CIDR"),
        ({"cidr": "10.0.0.0/08"}, "plain decimal"),
        ({"cidr": "010.0.0.0/8"}, "not a CIDR"),
        ({"cidr": "::ffff:10.0.0.0/104"}, "IPv4-mapped"),
    ],
)
def test_invalid_ip_blocks(block: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        IPBlock.model_validate(block)


@pytest.mark.parametrize(
    ("peer", "match"),
    [
        ({}, "needs podSelector, namespaceSelector or ipBlock"),
        ({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}, "cannot be combined"),
        ({"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}, "cannot be combined"),
    ],
)
def test_invalid_peers(peer: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Peer.model_validate(peer)


def test_peer_selectors_combine() -> None:
    peer = Peer.model_validate({"podSelector": {}, "namespaceSelector": {"matchLabels": {"team": "a"}}})
    assert peer.pod_selector is not None and peer.pod_selector.is_empty


def policy_spec(**changes: Any) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {"app": "backend"}}} | changes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (policy_spec(), [PolicyType.INGRESS]),
        (policy_spec(egress=[{}]), [PolicyType.INGRESS, PolicyType.EGRESS]),
        (
            policy_spec(egressDeny=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]),
            [PolicyType.INGRESS, PolicyType.EGRESS],
        ),
        (policy_spec(policyTypes=["Egress"]), [PolicyType.EGRESS]),
        (policy_spec(policyTypes=[], egress=[{}]), [PolicyType.INGRESS, PolicyType.EGRESS]),
    ],
)
def test_effective_policy_types(spec: dict[str, Any], expected: list[PolicyType]) -> None:
    assert NetworkIdentityPolicySpec.model_validate(spec).effective_policy_types() == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (policy_spec(policyTypes=["Egress"], ingressDeny=[{}]), "ingressDeny requires Ingress"),
        (policy_spec(policyTypes=["Ingress"], egressDeny=[{}]), "egressDeny requires Egress"),
        (policy_spec(policyTypes=["Ingress", "Ingress"]), "repeat"),
        (policy_spec(policyTypes=["Sideways"]), "policyTypes"),
        ({"ingress": []}, "podSelector"),
        (policy_spec(ingress=[{"from": [{"ipBlock": {"cidr": "nope"}}]}]), "not a CIDR"),
    ],
)
def test_invalid_policy_specs(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        NetworkIdentityPolicySpec.model_validate(spec)


def test_policy_from_alias_and_round_trip() -> None:
    doc = {
        "apiVersion": names.API_VERSION,
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": policy_spec(ingress=[{"from": [{"podSelector": {}}], "ports": [{"port": 80, "protocol": "TCP"}]}]),
    }
    policy = NetworkIdentityPolicy.model_validate(doc)
    rule = policy.spec.ingress[0]  # type: ignore[index]
    assert rule.from_ is not None and len(rule.from_) == 1
    assert policy.to_dict() == doc


# --------------------------------------------------------------------------------------
# BpfNodeState
# --------------------------------------------------------------------------------------


def node_program(**changes: Any) -> dict[str, Any]:
    programs = [program(ProgramType.TRACEPOINT)]
    source = "int fn(void *ctx) { return 0; }"
    return {
        "bpfProgram": "counter",
        "uid": "0b7c",
        "generation": 2,
        "contentHash": content_hash(source, None, [Program.model_validate(p) for p in programs]),
        "source": source,
        "programs": programs,
    } | changes


def test_content_hash_is_stable_and_sensitive() -> None:
    programs = [Program.model_validate(program(ProgramType.TRACEPOINT))]
    base = content_hash("int x;", ["-DA=1"], programs)
    assert base == content_hash("int x;", ["-DA=1"], copy.deepcopy(programs))
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != content_hash("int y;", ["-DA=1"], programs)
    assert base != content_hash("int x;", ["-DA=2"], programs)
    assert base != content_hash("int x;", [], programs)
    other = [Program.model_validate(program(ProgramType.TRACEPOINT, tracepoint="sched:sched_switch"))]
    assert base != content_hash("int x;", ["-DA=1"], other)
    assert content_hash("int x;", None, programs) == content_hash("int x;", [], programs)


def test_node_program_expected_hash() -> None:
    entry = NodeProgram.model_validate(node_program())
    assert entry.expected_hash() == entry.content_hash


def test_node_program_hash_syntax() -> None:
    with pytest.raises(ValidationError, match="contentHash"):
        NodeProgram.model_validate(node_program(contentHash="ABC"))


def node_state(name: str = "node-a", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": "BpfNodeState",
        "metadata": {"name": name},
        "spec": {"nodeName": "node-a", "programs": [node_program()]} | spec,
    }


def test_node_state_round_trip_with_status() -> None:
    doc = node_state(
        networkPolicy={
            "endpoints": [
                {
                    "namespace": "default",
                    "pod": "web-0",
                    "ip": "10.244.0.5",
                    "identity": 1001,
                    "ingressEnforced": True,
                    "egressEnforced": False,
                }
            ],
            "ipcache": [{"cidr": "10.244.0.5/32", "identity": 1001}, {"cidr": "10.244.0.9/32", "identity": 1002}],
            "cidrIdentities": [{"cidr": "10.0.0.0/8", "identity": 16777216}],
            "rules": [
                {
                    "localIdentity": 1001,
                    "direction": "Ingress",
                    "peerIdentity": 1002,
                    "protocol": "TCP",
                    "portStart": 8080,
                    "portEnd": 8080,
                    "action": "allow",
                    "policy": "default/frontend-to-backend",
                }
            ],
        }
    )
    doc["status"] = {
        "observedGeneration": 4,
        "attached": "1/1",
        "capabilities": {
            "kernelVersion": "6.8.0",
            "btf": True,
            "programTypes": {"kprobe": False, "xdp": True},
            "reasons": {"kprobe": "CONFIG_KPROBES is not set"},
        },
        "programs": [
            {
                "bpfProgram": "counter",
                "name": "fn",
                "contentHash": doc["spec"]["programs"][0]["contentHash"],
                "phase": "Attached",
                "programIds": [42],
                "attachPoints": ["tracepoint/raw_syscalls:sys_enter"],
                "lastTransitionTime": "2024-01-01T00:00:00Z",
            }
        ],
    }
    state = BpfNodeState.model_validate(doc)
    assert state.to_dict() == doc


def test_node_state_is_named_after_its_node() -> None:
    with pytest.raises(ValidationError, match=r"nodeName must equal metadata\.name"):
        BpfNodeState.model_validate(node_state(name="node-b"))


RULE = {"localIdentity": 300, "direction": "Ingress", "peerIdentity": 0, "action": "allow", "policy": "a/b"}


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ({k: v for k, v in RULE.items() if k != "localIdentity"}, "localIdentity"),
        ({**RULE, "protocol": "TCP", "portStart": 90, "portEnd": 80}, "portEnd"),
        ({**RULE, "portStart": 80, "portEnd": 80}, "protocol Any cannot restrict ports"),
        ({**RULE, "peerIdentity": -1}, "peerIdentity"),
        ({**RULE, "protocol": "ICMP"}, "protocol"),
        ({**RULE, "policy": "no-slash"}, "policy"),
    ],
)
def test_invalid_policy_rules(rule: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PolicyRule.model_validate(rule)


# --------------------------------------------------------------------------------------
# BpfProgram bytecode
# --------------------------------------------------------------------------------------

BYTECODE = {"configMapRef": {"namespace": "ns", "name": "objects", "key": "prog.o"}}
DIGEST = "sha256:" + "ab" * 32


def bytecode_program(**spec: Any) -> dict[str, Any]:
    doc = bpfprogram(bytecode=BYTECODE, **spec)
    del doc["spec"]["source"]
    return doc


def test_bytecode_is_an_alternative_to_source() -> None:
    resource = BpfProgram.model_validate(bytecode_program(globalData={"step": "AQAAAAAAAAA="}))
    assert resource.spec.source is None and resource.spec.bytecode is not None
    with pytest.raises(ValidationError, match="exactly one of source or bytecode must be set"):
        BpfProgram.model_validate(bpfprogram(bytecode=BYTECODE))
    neither = bpfprogram()
    del neither["spec"]["source"]
    with pytest.raises(ValidationError, match="exactly one of source or bytecode must be set"):
        BpfProgram.model_validate(neither)


def test_bytecode_needs_exactly_one_of_configmap_and_image() -> None:
    both = {**BYTECODE, "image": f"registry.example/objects/prog@{DIGEST}"}
    with pytest.raises(ValidationError, match="exactly one of configMapRef or image must be set"):
        BpfProgram.model_validate(bytecode_program() | {"spec": bytecode_program()["spec"] | {"bytecode": both}})


@pytest.mark.parametrize(
    "image",
    [f"quay.io/bpfman-bytecode/go-xdp-counter@{DIGEST}", "localhost:5000/prog:v1", f"r.example/a/b:v1@{DIGEST}"],
)
def test_image_references_by_digest_or_tag(image: str) -> None:
    doc = bytecode_program()
    doc["spec"]["bytecode"] = {"image": image}
    assert BpfProgram.model_validate(doc).spec.bytecode.image == image


@pytest.mark.parametrize("image", ["prog", "registry.example/prog", "Registry/Upper:v1", "r.example/p@sha256:abc"])
def test_image_references_without_tag_or_digest_are_rejected(image: str) -> None:
    doc = bytecode_program()
    doc["spec"]["bytecode"] = {"image": image}
    with pytest.raises(ValidationError, match="image"):
        BpfProgram.model_validate(doc)


def test_global_data_and_cflags_belong_to_their_code_source() -> None:
    with pytest.raises(ValidationError, match="globalData: only valid with bytecode"):
        BpfProgram.model_validate(bpfprogram(globalData={"step": "AQ=="}))
    with pytest.raises(ValidationError, match="cflags: only valid with source"):
        BpfProgram.model_validate(bytecode_program(cflags=["-DX=1"]))
    with pytest.raises(ValidationError, match=r"globalData\.step: not base64"):
        BpfProgram.model_validate(bytecode_program(globalData={"step": "not base64!"}))
    with pytest.raises(ValidationError, match="key 'not-a-name' must be a C identifier"):
        BpfProgram.model_validate(bytecode_program(globalData={"not-a-name": "AQ=="}))


def test_btf_attached_types_need_bytecode() -> None:
    fentry = program(ProgramType.FENTRY)
    with pytest.raises(ValidationError, match="programs: fn: fentry, fexit and lsm programs need bytecode"):
        BpfProgram.model_validate(bpfprogram(programs=[fentry]))
    assert BpfProgram.model_validate(bytecode_program(programs=[fentry])).spec.programs[0].function == "do_unlinkat"


def test_node_program_carries_exactly_one_code_source() -> None:
    base = {
        "bpfProgram": "p",
        "uid": "u",
        "generation": 1,
        "contentHash": "0" * 64,
        "programs": [program(ProgramType.TRACEPOINT)],
    }
    with pytest.raises(ValidationError, match="exactly one of source or bytecode must be set"):
        NodeProgram.model_validate(base)
    entry = NodeProgram.model_validate(base | {"bytecode": {"object": "f0VMRg==", "sha256": "1" * 64}})
    assert entry.expected_hash() != content_hash("x", None, entry.programs)
