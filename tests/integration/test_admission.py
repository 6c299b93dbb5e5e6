"""The real kube-apiserver rejects malformed beekeeper resources, naming the offending field.

Each case starts from a valid object and breaks exactly one thing: the apiserver skips CEL
rules once the plain schema fails ("some validation rules were not checked"), so a case
with two faults could hide the one it is about.
Every case is also checked against the pydantic models, which must agree.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from beekeeper.crds.names import API_VERSION
from beekeeper.crds.nodestate import content_hash
from beekeeper.crds.resources import BY_KIND

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("without_operator")]

DELETE = object()
SOURCE = "int fn(void *ctx) { return 0; }"


def valid_bpfprogram() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BpfProgram",
        "metadata": {"name": "valid"},
        "spec": {
            "nodeSelector": {
                "matchLabels": {"kubernetes.io/os": "linux"},
                "matchExpressions": [{"key": "node-role.kubernetes.io/edge", "operator": "DoesNotExist"}],
            },
            "source": {"inline": SOURCE},
            "cflags": ["-DDEBUG=0"],
            "programs": [{"name": "fn", "type": "tracepoint", "tracepoint": "raw_syscalls:sys_enter"}],
            "metrics": [
                {
                    "map": "counts",
                    "name": "test_total",
                    "type": "counter",
                    "help": "Test.",
                    "key": {"kind": "struct", "fields": [{"name": "comm", "type": "string", "label": "comm"}]},
                }
            ],
        },
    }


def valid_policy() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkIdentityPolicy",
        "metadata": {"name": "valid"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }
            ],
            "egress": [
                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]},
                {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 443}]},
            ],
            "egressDeny": [{"to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}]}],
        },
    }


def valid_node_state() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BpfNodeState",
        "metadata": {"name": "valid"},
        "spec": {
            "nodeName": "valid",
            "programs": [
                {
                    "bpfProgram": "counter",
                    "uid": str(uuid.uuid4()),
                    "generation": 1,
                    "contentHash": content_hash(SOURCE, None, []),
                    "source": SOURCE,
                    "programs": [{"name": "fn", "type": "tracepoint", "tracepoint": "raw_syscalls:sys_enter"}],
                }
            ],
            "networkPolicy": {
                "endpoints": [{"namespace": "a", "pod": "web", "ip": "10.250.6.30", "identity": 300}],
                "ipcache": [{"cidr": "10.250.6.31/32", "identity": 301}, {"cidr": "fd00::/64", "identity": 302}],
                "cidrIdentities": [{"cidr": "10.0.0.0/8", "identity": 16777216}],
                "rules": [
                    {
                        "localIdentity": 300,
                        "direction": "Ingress",
                        "peerIdentity": 301,
                        "protocol": "TCP",
                        "portStart": 80,
                        "portEnd": 90,
                        "action": "allow",
                        "policy": "a/web",
                    },
                    {"localIdentity": 300, "direction": "Egress", "peerIdentity": 0, "action": "deny", "policy": "a/x"},
                ],
                "slices": [{"name": "valid.0123456789ab-0", "contentHash": "a" * 64}],
            },
        },
    }


def valid_policy_slice() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BpfPolicySlice",
        "metadata": {"name": "valid"},
        "spec": {
            "nodeName": "node-1",
            "policy": "a/web",
            "contentHash": "b" * 64,
            "rules": [
                {
                    "localIdentity": 300,
                    "direction": "Ingress",
                    "action": "allow",
                    "peers": [0, 1, 301, 16777216],
                    "ports": [
                        {"protocol": "TCP", "portStart": 80, "portEnd": 90},
                        {"protocol": "UDP", "portStart": 53, "portEnd": 53},
                        {"protocol": "Any", "portStart": 0, "portEnd": 0},
                    ],
                }
            ],
            "ipcache": [{"identity": 301, "cidrs": ["10.250.6.31/32", "fd00::/64"]}],
            "cidrIdentities": [{"cidr": "10.0.0.0/8", "identity": 16777216}],
        },
    }


def valid_runtime_policy() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RuntimeSecurityPolicy",
        "metadata": {"name": "valid"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "backend"}},
            "containers": ["app"],
            "mode": "Audit",
            "rules": [
                {"name": "no-shells", "exec": {"paths": ["/bin/sh", "/bin/bash"]}, "action": "Block"},
                {"name": "no-tmp", "exec": {"pathPrefixes": ["/tmp/", "/dev/shm/"]}, "action": "Block"},
                {"name": "tools", "exec": {"paths": ["/usr/bin/id"], "pathPrefixes": ["/opt/"]}, "action": "Allow"},
            ],
            "defaultAction": "Audit",
        },
    }


VALID = {
    "RuntimeSecurityPolicy": valid_runtime_policy,
    "BpfProgram": valid_bpfprogram,
    "NetworkIdentityPolicy": valid_policy,
    "BpfNodeState": valid_node_state,
    "BpfPolicySlice": valid_policy_slice,
}


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set (or with DELETE remove) `spec.programs[0].direction`-style paths."""
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = doc
    for part in parts[:-1]:
        node = node[part]
    last = parts[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)


def without(item: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != key}


@dataclass(frozen=True)
class Case:
    """One malformed object: `changes` applied to a valid `kind`; `field` must appear in the error."""

    id: str
    kind: str
    changes: dict[str, Any]
    field: str
    message: str = ""

    def document(self, name: str) -> dict[str, Any]:
        doc = VALID[self.kind]()
        for path, value in self.changes.items():
            set_path(doc, path, value)
        doc["metadata"]["name"] = name
        if self.kind == "BpfNodeState" and "spec.nodeName" not in self.changes:
            doc["spec"]["nodeName"] = name
        return doc


P0 = "spec.programs[0]"
TC = {"name": "fn", "type": "tc", "interfaceSelector": {"pattern": "veth*"}, "direction": "ingress"}
XDP = {"name": "fn", "type": "xdp", "interfaceSelector": {"interfaces": ["eth0"]}}
UPROBE = {"name": "fn", "type": "uprobe", "binary": "/usr/lib/libc.so.6", "symbol": "malloc"}
CGROUP_SKB = {"name": "fn", "type": "cgroup_skb", "cgroupPath": "/sys/fs/cgroup", "direction": "egress"}
KPROBE = {"name": "fn", "type": "kprobe", "symbol": "tcp_v4_connect"}
METRIC0 = valid_bpfprogram()["spec"]["metrics"][0]
PEER0 = "spec.ingress[0].from[0]"
PORT0 = "spec.ingress[0].ports[0]"
NP = "spec.networkPolicy"
SR0 = "spec.rules[0]"
RR0 = "spec.rules[0]"
RSP = "RuntimeSecurityPolicy"

CASES = [
    # --- BpfProgram: structure and types -------------------------------------------------
    Case("program-missing-source", "BpfProgram", {"spec.source": DELETE}, "spec", "exactly one of source or bytecode"),
    Case("program-missing-programs", "BpfProgram", {"spec.programs": DELETE}, "spec.programs", "Required value"),
    Case("program-empty-programs", "BpfProgram", {"spec.programs": []}, "spec.programs"),
    Case("program-priority-wrong-type", "BpfProgram", {P0: TC | {"priority": "high"}}, f"{P0}.priority", "integer"),
    Case("program-priority-out-of-range", "BpfProgram", {P0: TC | {"priority": 0}}, f"{P0}.priority"),
    Case("program-unknown-type", "BpfProgram", {f"{P0}.type": "socket_filter"}, f"{P0}.type", "Unsupported value"),
    Case("program-bad-function-name", "BpfProgram", {f"{P0}.name": "count-syscalls"}, f"{P0}.name"),
    Case("program-unknown-field", "BpfProgram", {f"{P0}.tracepiont": "a:b"}, f"{P0}.tracepiont", "unknown field"),
    Case(
        "program-duplicate-names",
        "BpfProgram",
        {"spec.programs": [TC, KPROBE]},
        "spec.programs[1]",
        "Duplicate value",
    ),
    Case("program-cflag-not-a-flag", "BpfProgram", {"spec.cflags": ["DDEBUG"]}, "spec.cflags[0]"),
    # --- BpfProgram: source ---------------------------------------------------------------
    Case("source-neither", "BpfProgram", {"spec.source": {}}, "spec.source", "exactly one of inline or configMapRef"),
    Case(
        "source-both",
        "BpfProgram",
        {"spec.source.configMapRef": {"namespace": "kube-system", "name": "progs", "key": "fn.c"}},
        "spec.source",
        "exactly one of inline or configMapRef",
    ),
    # --- BpfProgram: node selector --------------------------------------------------------
    Case(
        "selector-bad-operator",
        "BpfProgram",
        {"spec.nodeSelector.matchExpressions[0]": {"key": "zone", "operator": "Equals", "values": ["a"]}},
        "spec.nodeSelector.matchExpressions[0].operator",
        "Unsupported value",
    ),
    Case(
        "selector-in-without-values",
        "BpfProgram",
        {"spec.nodeSelector.matchExpressions[0]": {"key": "zone", "operator": "In"}},
        "spec.nodeSelector.matchExpressions[0].values",
        "values must be non-empty",
    ),
    Case(
        "selector-exists-with-values",
        "BpfProgram",
        {"spec.nodeSelector.matchExpressions[0]": {"key": "zone", "operator": "Exists", "values": ["a"]}},
        "spec.nodeSelector.matchExpressions[0].values",
        "values must be empty",
    ),
    Case(
        "selector-bad-label-key",
        "BpfProgram",
        {"spec.nodeSelector.matchLabels": {"not a key": "x"}},
        "spec.nodeSelector.matchLabels",
        "label keys must be",
    ),
    Case(
        "selector-bad-label-value",
        "BpfProgram",
        {"spec.nodeSelector.matchLabels": {"app": "-web"}},
        "spec.nodeSelector.matchLabels.app",
    ),
    # --- BpfProgram: attach fields per type -----------------------------------------------
    Case("tc-without-direction", "BpfProgram", {P0: without(TC, "direction")}, f"{P0}.direction", "required"),
    Case(
        "xdp-without-interfaces",
        "BpfProgram",
        {P0: {"name": "fn", "type": "xdp"}},
        f"{P0}.interfaceSelector",
        "interfaceSelector is required",
    ),
    Case(
        "xdp-empty-interface-selector",
        "BpfProgram",
        {P0: XDP | {"interfaceSelector": {}}},
        f"{P0}.interfaceSelector",
        "needs interfaces or pattern",
    ),
    Case("xdp-with-direction", "BpfProgram", {P0: XDP | {"direction": "ingress"}}, f"{P0}.direction", "only valid"),
    Case("tc-with-xdp-mode", "BpfProgram", {P0: TC | {"xdpMode": "native"}}, f"{P0}.xdpMode", "only valid for xdp"),
    Case("tracepoint-with-binary", "BpfProgram", {f"{P0}.binary": "/bin/sh"}, f"{P0}.binary", "only valid"),
    Case("tracepoint-without-category", "BpfProgram", {f"{P0}.tracepoint": "sys_enter"}, f"{P0}.tracepoint"),
    Case(
        "raw-tracepoint-with-category",
        "BpfProgram",
        {f"{P0}.type": "raw_tracepoint"},
        f"{P0}.tracepoint",
        "bare tracepoint name",
    ),
    Case("uprobe-without-symbol", "BpfProgram", {P0: without(UPROBE, "symbol")}, f"{P0}.symbol", "required"),
    Case("uprobe-relative-binary", "BpfProgram", {P0: UPROBE | {"binary": "lib/libc.so"}}, f"{P0}.binary"),
    Case("uprobe-binary-dotdot", "BpfProgram", {P0: UPROBE | {"binary": "/usr/../etc/x"}}, f"{P0}.binary", "'..'"),
    Case("kprobe-with-binary", "BpfProgram", {P0: KPROBE | {"binary": "/bin/sh"}}, f"{P0}.binary", "only valid"),
    Case("cgroup-skb-without-path", "BpfProgram", {P0: without(CGROUP_SKB, "cgroupPath")}, f"{P0}.cgroupPath"),
    Case(
        "cgroup-sock-addr-bad-attach-type",
        "BpfProgram",
        {P0: {"name": "fn", "type": "cgroup_sock_addr", "cgroupPath": "/sys/fs/cgroup", "attachType": "accept4"}},
        f"{P0}.attachType",
        "Unsupported value",
    ),
    Case(
        "cgroup-sock-addr-without-attach-type",
        "BpfProgram",
        {P0: {"name": "fn", "type": "cgroup_sock_addr", "cgroupPath": "/sys/fs/cgroup"}},
        f"{P0}.attachType",
        "required",
    ),
    # --- BpfProgram: metrics --------------------------------------------------------------
    Case("metric-bad-name", "BpfProgram", {"spec.metrics[0].name": "9-lives"}, "spec.metrics[0].name"),
    Case("metric-bad-type", "BpfProgram", {"spec.metrics[0].type": "histogram"}, "spec.metrics[0].type"),
    Case(
        "metric-struct-without-fields",
        "BpfProgram",
        {"spec.metrics[0].key": {"kind": "struct"}},
        "spec.metrics[0].key.fields",
        "struct keys need fields",
    ),
    Case(
        "metric-int-without-label",
        "BpfProgram",
        {"spec.metrics[0].key": {"kind": "int"}},
        "spec.metrics[0].key.label",
        "need label",
    ),
    Case(
        "metric-size-on-integer-field",
        "BpfProgram",
        {"spec.metrics[0].key.fields[0]": {"name": "pid", "type": "u32", "size": 4, "label": "pid"}},
        "spec.metrics[0].key.fields[0].size",
    ),
    Case(
        "metric-reserved-prefix",
        "BpfProgram",
        {"spec.metrics[0].name": "beekeeper_policy_packets_total"},
        "spec.metrics[0].name",
        "reserved for beekeeper's own",
    ),
    Case(
        "metric-reserved-struct-label",
        "BpfProgram",
        {"spec.metrics[0].key.fields[0].label": "bpfprogram"},
        "spec.metrics[0].key.fields[0].label",
        "'bpfprogram' is reserved",
    ),
    Case(
        "metric-reserved-key-label",
        "BpfProgram",
        {"spec.metrics[0].key": {"kind": "int", "label": "bpfprogram"}},
        "spec.metrics[0].key.label",
        "'bpfprogram' is reserved",
    ),
    Case(
        "metric-duplicate-name",
        "BpfProgram",
        {"spec.metrics": [METRIC0, METRIC0 | {"map": "other"}]},
        "spec.metrics[1]",
        "Duplicate value",
    ),
    Case(
        "metric-same-family",
        "BpfProgram",
        {"spec.metrics": [METRIC0, METRIC0 | {"name": "test", "type": "gauge"}]},
        "spec.metrics",
        "must differ after removing a _total suffix",
    ),
    Case("metric-name-with-dash", "BpfProgram", {"spec.metrics[0].name": "test-total"}, "spec.metrics[0].name"),
    # --- NetworkIdentityPolicy ------------------------------------------------------------
    Case("policy-missing-pod-selector", "NetworkIdentityPolicy", {"spec.podSelector": DELETE}, "spec.podSelector"),
    Case("policy-ingress-not-a-list", "NetworkIdentityPolicy", {"spec.ingress": {}}, "spec.ingress", "array"),
    Case("policy-bad-policy-type", "NetworkIdentityPolicy", {"spec.policyTypes": ["Inbound"]}, "spec.policyTypes[0]"),
    Case(
        "policy-duplicate-policy-type",
        "NetworkIdentityPolicy",
        {"spec.policyTypes": ["Ingress", "Ingress"]},
        "spec.policyTypes[1]",
        "Duplicate value",
    ),
    Case(
        "policy-egress-deny-without-egress-type",
        "NetworkIdentityPolicy",
        {"spec.policyTypes": ["Ingress"], "spec.egress": DELETE},
        "spec.egressDeny",
        "requires Egress",
    ),
    Case(
        "peer-invalid-cidr",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.0/33"}}},
        f"{PEER0}.ipBlock.cidr",
        "must be a CIDR",
    ),
    Case(
        "peer-cidr-without-prefix",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.1"}}},
        f"{PEER0}.ipBlock.cidr",
        "must be a CIDR",
    ),
    Case(
        "peer-except-outside-cidr",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}},
        f"{PEER0}.ipBlock.except",
        "strict subsets of cidr",
    ),
    Case(
        "peer-except-equals-cidr",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}},
        f"{PEER0}.ipBlock.except",
        "strict subsets of cidr",
    ),
    Case(
        "peer-except-other-family",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}},
        f"{PEER0}.ipBlock.except",
        "same IP family",
    ),
    Case(
        "peer-except-not-a-cidr",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "bogus"]}}},
        f"{PEER0}.ipBlock.except[1]",
        "must be a CIDR",
    ),
    Case(
        "peer-ipblock-with-pod-selector",
        "NetworkIdentityPolicy",
        {PEER0: {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}},
        f"{PEER0}.ipBlock",
        "cannot be combined",
    ),
    Case("peer-empty", "NetworkIdentityPolicy", {PEER0: {}}, PEER0, "a peer needs"),
    Case(
        "peer-bad-selector-operator",
        "NetworkIdentityPolicy",
        {"spec.egress[0].to[0].namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}},
        "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].operator",
    ),
    Case(
        "port-out-of-range", "NetworkIdentityPolicy", {f"{PORT0}.port": 70000}, f"{PORT0}.port", "Invalid value: 70000"
    ),
    Case("port-zero", "NetworkIdentityPolicy", {f"{PORT0}.port": 0}, f"{PORT0}.port"),
    Case("port-uppercase-name", "NetworkIdentityPolicy", {f"{PORT0}.port": "HTTP"}, f"{PORT0}.port", "IANA"),
    Case("port-digits-as-string", "NetworkIdentityPolicy", {f"{PORT0}.port": "8080"}, f"{PORT0}.port", 'port "8080"'),
    Case("port-name-too-long", "NetworkIdentityPolicy", {f"{PORT0}.port": "a-very-long-name"}, f"{PORT0}.port"),
    Case(
        "port-end-below-port",
        "NetworkIdentityPolicy",
        {f"{PORT0}.endPort": 8000},
        f"{PORT0}.endPort",
        "greater than or equal to port",
    ),
    Case(
        "port-end-with-named-port",
        "NetworkIdentityPolicy",
        {PORT0: {"port": "http", "endPort": 8090}},
        f"{PORT0}.endPort",
        "numeric port",
    ),
    Case("port-end-without-port", "NetworkIdentityPolicy", {PORT0: {"endPort": 8090}}, f"{PORT0}.endPort"),
    Case("port-end-out-of-range", "NetworkIdentityPolicy", {f"{PORT0}.endPort": 65536}, f"{PORT0}.endPort"),
    Case("port-bad-protocol", "NetworkIdentityPolicy", {f"{PORT0}.protocol": "ICMP"}, f"{PORT0}.protocol"),
    # --- BpfNodeState ---------------------------------------------------------------------
    Case("node-state-name-mismatch", "BpfNodeState", {"spec.nodeName": "other-node"}, "spec.nodeName", "must equal"),
    Case(
        "node-state-bad-hash", "BpfNodeState", {"spec.programs[0].contentHash": "abc"}, "spec.programs[0].contentHash"
    ),
    Case(
        "node-state-nested-program-rule",
        "BpfNodeState",
        {"spec.programs[0].programs[0].direction": "ingress"},
        "spec.programs[0].programs[0].direction",
        "only valid",
    ),
    # --- BpfNodeState: policy datapath (everything the daemon would refuse) ----------------
    Case(
        "node-state-endpoint-bad-ip",
        "BpfNodeState",
        {f"{NP}.endpoints[0].ip": "10.250.6.300"},
        f"{NP}.endpoints[0].ip",
        "must be an IP address, not 10.250.6.300",
    ),
    Case(
        "node-state-endpoint-identity-zero",
        "BpfNodeState",
        {f"{NP}.endpoints[0].identity": 0},
        f"{NP}.endpoints[0].identity",
        "Invalid value: 0",
    ),
    Case(
        "node-state-rule-ports-reversed",
        "BpfNodeState",
        {f"{NP}.rules[0].portStart": 90, f"{NP}.rules[0].portEnd": 80},
        f"{NP}.rules[0].portEnd",
        "greater than or equal to portStart",
    ),
    Case(
        "node-state-rule-port-out-of-range",
        "BpfNodeState",
        {f"{NP}.rules[0].portEnd": 70000},
        f"{NP}.rules[0].portEnd",
        "Invalid value: 70000",
    ),
    Case(
        "node-state-rule-any-with-ports",
        "BpfNodeState",
        {f"{NP}.rules[0].protocol": "Any"},
        f"{NP}.rules[0].protocol",
        "cannot restrict ports",
    ),
    Case(
        "node-state-rule-local-identity-zero",
        "BpfNodeState",
        {f"{NP}.rules[0].localIdentity": 0},
        f"{NP}.rules[0].localIdentity",
    ),
    Case(
        "node-state-ipcache-without-prefix",
        "BpfNodeState",
        {f"{NP}.ipcache[0].cidr": "10.250.6.31"},
        f"{NP}.ipcache[0].cidr",
        "canonical prefix",
    ),
    Case(
        "node-state-ipcache-host-bits",
        "BpfNodeState",
        {f"{NP}.cidrIdentities[0].cidr": "10.1.2.3/8"},
        f"{NP}.cidrIdentities[0].cidr",
        "not 10.1.2.3/8",
    ),
    Case(
        "node-state-ipcache-twice",
        "BpfNodeState",
        {f"{NP}.ipcache[1].cidr": "10.250.6.31/32"},
        f"{NP}.ipcache[1]",
        "Duplicate value",
    ),
    Case(
        "node-state-slice-bad-hash",
        "BpfNodeState",
        {f"{NP}.slices[0].contentHash": "abc"},
        f"{NP}.slices[0].contentHash",
    ),
    # --- BpfPolicySlice ---------------------------------------------------------------------
    Case(
        "slice-ports-reversed",
        "BpfPolicySlice",
        {f"{SR0}.ports[0].portEnd": 70},
        f"{SR0}.ports[0].portEnd",
        "greater than or equal",
    ),
    Case(
        "slice-any-with-ports",
        "BpfPolicySlice",
        {f"{SR0}.ports[1].protocol": "Any"},
        f"{SR0}.ports[1].protocol",
        "cannot restrict ports",
    ),
    Case("slice-no-peers", "BpfPolicySlice", {f"{SR0}.peers": []}, f"{SR0}.peers"),
    Case("slice-local-identity-zero", "BpfPolicySlice", {f"{SR0}.localIdentity": 0}, f"{SR0}.localIdentity"),
    Case(
        "slice-cidr-without-prefix",
        "BpfPolicySlice",
        {"spec.cidrIdentities[0].cidr": "10.0.0.0"},
        "spec.cidrIdentities[0].cidr",
        "canonical prefix",
    ),
    Case("slice-bad-policy-ref", "BpfPolicySlice", {"spec.policy": "web"}, "spec.policy"),
    Case("slice-rules-without-policy", "BpfPolicySlice", {"spec.policy": DELETE}, "spec", "need a policy"),
    Case(
        "slice-address-not-a-prefix",
        "BpfPolicySlice",
        {"spec.ipcache[0].cidrs[1]": "fd00::"},
        "spec.ipcache[0].cidrs[1]",
    ),
    Case("slice-identity-without-addresses", "BpfPolicySlice", {"spec.ipcache[0].cidrs": []}, "spec.ipcache[0].cidrs"),
    # --- RuntimeSecurityPolicy ------------------------------------------------------------
    Case("rsp-relative-path", RSP, {f"{RR0}.exec.paths[0]": "bin/sh"}, f"{RR0}.exec.paths[0]", "absolute path"),
    Case("rsp-dotdot-path", RSP, {f"{RR0}.exec.paths[0]": "/usr/../bin/sh"}, f"{RR0}.exec.paths[0]", "'..'"),
    Case("rsp-empty-path", RSP, {f"{RR0}.exec.paths[0]": ""}, f"{RR0}.exec.paths[0]"),
    Case("rsp-path-is-directory", RSP, {f"{RR0}.exec.paths[0]": "/bin/"}, f"{RR0}.exec.paths[0]", "name a file"),
    Case(
        "rsp-prefix-without-slash",
        RSP,
        {"spec.rules[1].exec.pathPrefixes[0]": "/tmp"},
        "spec.rules[1].exec.pathPrefixes[0]",
        "must end with /",
    ),
    Case(
        "rsp-prefix-relative",
        RSP,
        {"spec.rules[1].exec.pathPrefixes[0]": "tmp/"},
        "spec.rules[1].exec.pathPrefixes[0]",
        "absolute path",
    ),
    Case("rsp-unknown-action", RSP, {f"{RR0}.action": "Kill"}, f"{RR0}.action", "Unsupported value"),
    Case("rsp-unknown-mode", RSP, {"spec.mode": "Enforcing"}, "spec.mode", "Unsupported value"),
    Case("rsp-empty-rules", RSP, {"spec.rules": []}, "spec.rules"),
    Case("rsp-missing-rules", RSP, {"spec.rules": DELETE}, "spec.rules", "Required value"),
    Case("rsp-empty-exec", RSP, {f"{RR0}.exec": {}}, f"{RR0}.exec", "exec needs paths or pathPrefixes"),
    Case("rsp-rule-without-exec", RSP, {f"{RR0}.exec": DELETE}, f"{RR0}.exec", "Required value"),
    Case(
        "rsp-duplicate-rule-name",
        RSP,
        {"spec.rules[1].name": "no-shells"},
        "spec.rules[1]",
        "Duplicate value",
    ),
    Case(
        "rsp-duplicate-path",
        RSP,
        {f"{RR0}.exec.paths": ["/bin/sh", "/bin/sh"]},
        f"{RR0}.exec.paths[1]",
        "Duplicate value",
    ),
    Case(
        "rsp-conflicting-rules",
        RSP,
        {"spec.rules[2].exec.paths": ["/usr/bin/id", "/bin/sh"]},
        "spec.rules",
        "different actions",
    ),
    Case(
        "rsp-conflicting-prefixes",
        RSP,
        {"spec.rules[2].exec.pathPrefixes": ["/tmp/"]},
        "spec.rules",
        "different actions",
    ),
    Case(
        "rsp-allow-without-default",
        RSP,
        {"spec.defaultAction": DELETE},
        "spec.defaultAction",
        "Allow rules need spec.defaultAction",
    ),
    Case("rsp-default-allow", RSP, {"spec.defaultAction": "Allow"}, "spec.defaultAction", "Unsupported value"),
    Case("rsp-bad-container-name", RSP, {"spec.containers": ["App_1"]}, "spec.containers[0]"),
    Case("rsp-bad-rule-name", RSP, {f"{RR0}.name": "No Shells"}, f"{RR0}.name"),
]


@pytest.fixture(scope="module")
def policy_namespace(cluster: Any) -> Iterator[str]:
    """One namespace for every namespaced case: nothing is expected to be created in it."""
    name = f"admission-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(cluster: Any, doc: dict[str, Any], namespace: str, *extra: str) -> Any:
    args = ["apply", "-f", "-", *extra]
    if BY_KIND[doc["kind"]].names.namespaced:
        args += ["-n", namespace]
    return cluster.kubectl(*args, input=json.dumps(doc), check=False)


def delete(cluster: Any, doc: dict[str, Any], namespace: str) -> None:
    args = ["delete", doc["kind"].lower() + ".beekeeper.dev", doc["metadata"]["name"], "--ignore-not-found"]
    if BY_KIND[doc["kind"]].names.namespaced:
        args += ["-n", namespace]
    cluster.kubectl(*args, check=False)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_baselines_are_accepted(cluster: Any, policy_namespace: str, kind: str) -> None:
    doc = VALID[kind]()
    doc["metadata"]["name"] = f"baseline-{uuid.uuid4().hex[:6]}"
    if kind == "BpfNodeState":
        doc["spec"]["nodeName"] = doc["metadata"]["name"]
    BY_KIND[kind].model_validate(doc)
    try:
        result = apply(cluster, doc, policy_namespace)
        assert result.returncode == 0, result.stderr
    finally:
        delete(cluster, doc, policy_namespace)


def test_an_address_slice_without_a_policy_is_accepted(cluster: Any, policy_namespace: str) -> None:
    """An identity's addresses, shared by the node's policies naming it, belong to no one policy."""
    doc = valid_policy_slice()
    doc["metadata"]["name"] = f"addresses-{uuid.uuid4().hex[:6]}"
    doc["spec"] = {k: v for k, v in doc["spec"].items() if k not in ("policy", "rules", "cidrIdentities")}
    BY_KIND["BpfPolicySlice"].model_validate(doc)
    try:
        result = apply(cluster, doc, policy_namespace)
        assert result.returncode == 0, result.stderr
    finally:
        delete(cluster, doc, policy_namespace)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_resource_is_rejected(cluster: Any, policy_namespace: str, case: Case) -> None:
    doc = case.document(f"bad-{case.id}"[:63])
    result = apply(cluster, doc, policy_namespace)
    if result.returncode == 0:
        delete(cluster, doc, policy_namespace)
    assert result.returncode != 0, f"{case.id} was accepted:\n{json.dumps(doc, indent=2)}"
    assert case.field in result.stderr, f"error does not name {case.field}:\n{result.stderr}"
    assert case.message in result.stderr, f"error does not say {case.message!r}:\n{result.stderr}"

    with pytest.raises(ValidationError):
        BY_KIND[case.kind].model_validate(doc)


# A valid program of every type, with every optional attach field of that type: none of the
# rules may be stricter than intended.
ALL_TYPES = [
    XDP | {"xdpMode": "generic"},
    TC | {"priority": 1000, "interfaceSelector": {"interfaces": ["eth0", "eth1"], "pattern": "veth*"}},
    {"name": "fn", "type": "tracepoint", "tracepoint": "sched:sched_process_exec"},
    {"name": "fn", "type": "raw_tracepoint", "tracepoint": "sched_switch"},
    UPROBE | {"offset": 16, "pid": 1},
    {"name": "fn", "type": "uretprobe", "binary": "/bin/bash", "symbol": "readline", "pid": 4194304},
    KPROBE | {"offset": 0},
    {"name": "fn", "type": "kretprobe", "symbol": "do_sys_openat2"},
    CGROUP_SKB | {"direction": "ingress"},
    {"name": "fn", "type": "cgroup_sock_addr", "cgroupPath": "/sys/fs/cgroup/a.slice", "attachType": "getsockname6"},
]


@pytest.mark.parametrize("program", ALL_TYPES, ids=[p["type"] for p in ALL_TYPES])
def test_every_program_type_is_accepted(cluster: Any, policy_namespace: str, program: dict[str, Any]) -> None:
    doc = valid_bpfprogram()
    doc["metadata"]["name"] = f"type-{program['type'].replace('_', '-')}"
    doc["spec"]["programs"] = [program]
    BY_KIND["BpfProgram"].model_validate(doc)
    result = apply(cluster, doc, policy_namespace, "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_node_name_is_immutable(cluster: Any, policy_namespace: str) -> None:
    doc = valid_node_state()
    name = f"immutable-{uuid.uuid4().hex[:6]}"
    doc["metadata"]["name"] = doc["spec"]["nodeName"] = name
    try:
        assert apply(cluster, doc, policy_namespace).returncode == 0
        result = cluster.kubectl(
            "patch", "bpfnodestate", name, "--type=merge", "-p", '{"spec":{"nodeName":"elsewhere"}}', check=False
        )
        assert result.returncode != 0
        assert "spec.nodeName" in result.stderr and "immutable" in result.stderr
    finally:
        delete(cluster, doc, policy_namespace)


def test_status_is_validated_and_shown_in_columns(cluster: Any, policy_namespace: str) -> None:
    doc = valid_bpfprogram()
    name = f"status-{uuid.uuid4().hex[:6]}"
    doc["metadata"]["name"] = name
    try:
        assert apply(cluster, doc, policy_namespace).returncode == 0
        bad = {"status": {"phase": "Sleeping"}}
        result = cluster.kubectl(
            "patch", "bpfprogram", name, "--subresource=status", "--type=merge", "-p", json.dumps(bad), check=False
        )
        assert result.returncode != 0 and "status.phase" in result.stderr
        status = {
            "status": {
                "observedGeneration": 1,
                "ready": "2/3",
                "phase": "Progressing",
                "nodes": {"selected": 3, "ready": 2, "failed": 0},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": "NodesPending",
                        "message": "1 node pending",
                        "lastTransitionTime": "2024-01-01T00:00:00Z",
                        "observedGeneration": 1,
                    }
                ],
            }
        }
        cluster.kubectl("patch", "bpfprogram", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
        table = cluster.kubectl("get", "bpfp", name, "--no-headers").stdout.split()
        assert table[:3] == [name, "2/3", "Progressing"]
        assert name in cluster.kubectl("get", "beekeeper").stdout
    finally:
        delete(cluster, doc, policy_namespace)


def test_kubectl_explain_is_useful(cluster: Any) -> None:
    out = cluster.kubectl("explain", "bpfprogram.spec.programs").stdout
    assert "Functions of the source" in out and "direction" in out and "tc, cgroup_skb" in out
    out = cluster.kubectl("explain", "networkidentitypolicy.spec.ingressDeny.from.ipBlock").stdout
    assert "except" in out and "cidr" in out


def test_runtime_policy_columns_are_filled(cluster: Any, policy_namespace: str) -> None:
    doc = valid_runtime_policy()
    name = f"rsp-{uuid.uuid4().hex[:6]}"
    doc["metadata"]["name"] = name
    try:
        assert apply(cluster, doc, policy_namespace).returncode == 0
        condition = {"status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z", "observedGeneration": 1}
        status = {
            "status": {
                "observedGeneration": 1,
                "conditions": [
                    {"type": "Valid", "reason": "Accepted", "message": "", **condition},
                    {"type": "Ready", "reason": "Enforced", "message": "enforced on 2/2 nodes", **condition},
                ],
                "selectedPods": 3,
                "nodesEnforcing": 2,
                "matches": 7,
                "hooks": {"tracepoint": 2},
            }
        }
        args = ["patch", "rsp", name, "-n", policy_namespace, "--subresource=status", "--type=merge"]
        cluster.kubectl(*args, "-p", json.dumps(status))
        table = cluster.kubectl("get", "rsp", name, "-n", policy_namespace, "--no-headers").stdout.split()
        assert table[:7] == [name, "Audit", "True", "True", "3", "2", "7"]
        assert name in cluster.kubectl("get", "beekeeper", "-n", policy_namespace).stdout
        out = cluster.kubectl("explain", "runtimesecuritypolicy.spec.rules.exec").stdout
        words = " ".join(out.split())  # kubectl explain wraps at its own width; the description is one line
        assert "pathPrefixes" in words and "a link to one is the same file" in words
    finally:
        delete(cluster, doc, policy_namespace)


def test_node_state_carries_an_object_of_any_bytes(cluster: Any, policy_namespace: str) -> None:
    """Every byte value, so the base64 holds '+' and '/' as a real ELF's does (the apiserver's CEL once
    refused those in a `format: byte` field its rules read); what is not base64 is refused."""
    data = bytes(range(256))
    doc = valid_node_state()
    doc["metadata"]["name"] = doc["spec"]["nodeName"] = f"object-{uuid.uuid4().hex[:6]}"
    entry = doc["spec"]["programs"][0]
    del entry["source"]
    entry["bytecode"] = {"object": base64.b64encode(data).decode(), "sha256": hashlib.sha256(data).hexdigest()}
    assert {"+", "/"} <= set(entry["bytecode"]["object"])
    BY_KIND["BpfNodeState"].model_validate(doc)
    result = apply(cluster, doc, policy_namespace, "--dry-run=server")
    assert result.returncode == 0, result.stderr

    entry["bytecode"]["object"] = "not base64!"
    result = apply(cluster, doc, policy_namespace, "--dry-run=server")
    assert result.returncode != 0 and "spec.programs[0].bytecode.object" in result.stderr, result.stderr
    with pytest.raises(ValidationError):
        BY_KIND["BpfNodeState"].model_validate(doc)
