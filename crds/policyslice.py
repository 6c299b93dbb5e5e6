"""BpfPolicySlice: a bounded piece of one node's policy maps.

Node policy state comes in bounded pieces: the node's own addresses stay in BpfNodeState,
its endpoints (local pods) get slices of their own, every policy with endpoints on the node
gets one or more slices of its own (its rules and ipBlock prefixes), and every pod identity
the node's rules name gets one or more slices of its pods' addresses, shared by the policies
naming it.
All are written by the operator and watched by that node's daemon through a field selector
on spec.nodeName. A policy's size therefore never decides whether another policy (or a new
pod) reaches the node, a node's total is not bounded by one etcd object, and a pod starting
rewrites its identity's address slice once per node, not every policy slice naming it. The
node state lists every slice by content hash: a change anywhere on the node rewrites that
list, so the endpoints (most of a node's bytes, and most of the apiserver's work per write)
are not in it.
Rules are shipped factored, (local identity, direction, action, peer identities, port
ranges), and the daemon expands the product locally, so the wire size grows with peers plus
ports, not peers times ports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from beekeeper.crds.common import (
    AGE_COLUMN,
    ApiModel,
    DnsSubdomain,
    PrinterColumn,
    Resource,
    atomic_list,
    cel,
    validations,
)
from beekeeper.crds.names import BPF_POLICY_SLICE
from beekeeper.crds.networkpolicy import PolicyType
from beekeeper.crds.nodestate import (
    POLICY_REF_PATTERN,
    ContentHash,
    Endpoint,
    Identity,
    IpcacheEntry,
    LocalIdentity,
    PolicyAction,
    RuleProtocol,
    check_port_range,
    check_prefix,
    check_unique,
    port_range_rules,
)

MAX_SLICE_RULES = 1024
MAX_RULE_PEERS = 1024
MAX_RULE_PORTS = 64
MAX_SLICE_IPCACHE = 8192
MAX_SLICE_CIDR_IDENTITIES = 2048
MAX_SLICE_ENDPOINTS = 512
"""At most ~360 bytes each (the longest names): a full part stays under SLICE_BYTES."""


class PortRange(ApiModel):
    """Destination ports of one protocol; protocol Any with portStart = portEnd = 0 matches everything."""

    model_config = ConfigDict(json_schema_extra=port_range_rules())

    protocol: RuleProtocol = Field(RuleProtocol.ANY, description="TCP, UDP, SCTP or Any.")
    port_start: int = Field(0, ge=0, le=65535, description="First destination port; 0 with portEnd 0 means any port.")
    port_end: int = Field(0, ge=0, le=65535, description="Last destination port (inclusive).")

    @model_validator(mode="after")
    def _ports(self) -> PortRange:
        check_port_range(self.protocol, self.port_start, self.port_end)
        return self


class SliceRule(ApiModel):
    """Entries for every (peer, port range) pair: the daemon writes the product into the maps."""

    local_identity: LocalIdentity = Field(description="Identity of the local endpoints the rule applies to; never 0.")
    direction: PolicyType = Field(description="Ingress (into the local endpoint) or Egress (out of it).")
    action: PolicyAction = Field(description="allow or deny; deny wins.")
    peers: list[Identity] = Field(
        min_length=1,
        max_length=MAX_RULE_PEERS,
        description="Peer identities: pod identities, CIDR identities (cidrIdentities), 1 host, 0 any.",
    )
    ports: list[PortRange] = Field(min_length=1, max_length=MAX_RULE_PORTS, description="Port ranges (any of them).")


ADDRESS_PATTERN = r"^[0-9a-fA-F.:]+/[0-9]{1,3}$"
"""The shape of a prefix; the canonical form is checked by the model (a CEL rule per item of a nested
list exceeds the apiserver's cost budget)."""
AddressPrefix = Annotated[
    str, Field(min_length=3, max_length=49, pattern=ADDRESS_PATTERN), AfterValidator(check_prefix)
]


class Address(NamedTuple):
    """One ipcache entry of a slice, as the daemon reads them (the wire groups them by identity)."""

    cidr: str
    identity: int


# Grouped, a slice names each identity once: an address costs its text, where an object of two fields
# per address made the apiserver's work per slice write 2.6x and the stored slice 2x.
class IdentityAddresses(ApiModel):
    """The addresses of one pod identity."""

    identity: Identity = Field(description="The pod identity these addresses have.")
    cidrs: list[AddressPrefix] = Field(
        min_length=1,
        max_length=MAX_SLICE_IPCACHE,
        description="Its pods' addresses, canonical prefixes (e.g. 10.244.1.7/32).",
        json_schema_extra=atomic_list(),
    )


class BpfPolicySliceSpec(ApiModel):
    """One policy's entries, one identity's addresses or the node's endpoints, for one node (or a
    size-bounded part of them); written by the operator only."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.policy) || (!has(self.rules) && !has(self.cidrIdentities))",
                "rules and cidrIdentities need a policy: a slice without one holds addresses or endpoints only",
            ),
            cel(
                "!has(self.endpoints) || (!has(self.policy) && !has(self.ipcache))",
                "endpoints travel in slices of their own, without a policy or addresses",
            ),
        )
    )

    node_name: DnsSubdomain = Field(
        description="The node whose daemon applies this slice.",
        json_schema_extra=validations(cel("self == oldSelf", "nodeName is immutable")),
    )
    policy: str | None = Field(
        None,
        max_length=317,
        pattern=POLICY_REF_PATTERN,
        description="namespace/name of the NetworkIdentityPolicy; absent for the addresses of an identity, which "
        "every policy naming it on the node shares, and for the node's endpoints.",
    )
    content_hash: ContentHash = Field(
        description="sha256 of the entries below; BpfNodeState.spec.networkPolicy.slices pins it."
    )
    rules: list[SliceRule] | None = Field(None, max_length=MAX_SLICE_RULES, description="Factored policy entries.")
    ipcache: list[IdentityAddresses] | None = Field(
        None,
        max_length=MAX_SLICE_IPCACHE,
        description=f"Addresses of the pod identities the rules name, per identity (at most {MAX_SLICE_IPCACHE}).",
        json_schema_extra=atomic_list(),
    )
    cidr_identities: list[IpcacheEntry] | None = Field(
        None,
        max_length=MAX_SLICE_CIDR_IDENTITIES,
        description="The ipBlock prefixes the rules name, with their CIDR identities.",
        json_schema_extra=atomic_list(),
    )
    endpoints: list[Endpoint] | None = Field(
        None,
        max_length=MAX_SLICE_ENDPOINTS,
        description="Local pods of the node with their identities and isolation (the daemon applies the endpoints "
        "of every slice its node state lists, with any listed inline).",
    )

    @model_validator(mode="after")
    def _unique(self) -> BpfPolicySliceSpec:
        addresses = self.addresses()
        if len(addresses) > MAX_SLICE_IPCACHE:
            raise ValueError(f"ipcache: {len(addresses)} addresses, more than {MAX_SLICE_IPCACHE}")
        check_unique(addresses, "cidr", "ipcache")
        check_unique(self.cidr_identities, "cidr", "cidrIdentities")
        if self.policy is None and (self.rules or self.cidr_identities):
            raise ValueError(
                "rules and cidrIdentities need a policy: a slice without one holds addresses or endpoints only"
            )
        if self.endpoints is not None and (self.policy is not None or self.ipcache is not None):
            raise ValueError("endpoints travel in slices of their own, without a policy or addresses")
        return self

    def addresses(self) -> list[Address]:
        """The ipcache entries, one per address."""
        return [Address(cidr, group.identity) for group in self.ipcache or [] for cidr in group.cidrs]


class BpfPolicySlice(Resource):
    """BpfPolicySlice is one NetworkIdentityPolicy's datapath entries, one identity's pod addresses or the
    node's endpoints, for one node, written by the operator and read by that node's daemon. Listed (with
    its content hash) by the node's BpfNodeState; not meant to be edited by hand.
    """

    names: ClassVar = BPF_POLICY_SLICE
    printer_columns: ClassVar = (
        PrinterColumn("Node", ".spec.nodeName", "string", "Node whose daemon applies the slice"),
        PrinterColumn(
            "Policy", ".spec.policy", "string", "NetworkIdentityPolicy of the entries (none: addresses or endpoints)"
        ),
        AGE_COLUMN,
    )
    selectable_fields: ClassVar = (".spec.nodeName",)

    kind: Literal["BpfPolicySlice"] = Field("BpfPolicySlice", description="BpfPolicySlice")
    spec: BpfPolicySliceSpec = Field(description="The entries, written by the operator.")


# --------------------------------------------------------------------------------------
# Packing (the operator's side)
# --------------------------------------------------------------------------------------


def slice_hash(body: Mapping[str, Any]) -> str:
    """sha256 over a slice's entries (rules, ipcache, cidrIdentities, endpoints), canonical JSON; endpoints
    only where there are some, so the hashes of the other slices are what they were before endpoints moved."""
    entries = {k: body.get(k) or [] for k in ("policy", "rules", "ipcache", "cidrIdentities")}
    if body.get("endpoints"):
        entries["endpoints"] = body["endpoints"]
    canonical = json.dumps(
        entries,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


SLICE_BYTES = 256 * 1024
"""Target wire size of one slice: far below etcd's 1.5 MiB request limit, whatever the policy."""


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def split_rule(rule: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A rule with more peers or ports than one SliceRule holds, as several (the same product)."""
    for peers in _chunks(list(rule["peers"]), MAX_RULE_PEERS):
        for ports in _chunks(list(rule["ports"]), MAX_RULE_PORTS):
            yield {**rule, "peers": peers, "ports": ports}


_PLAIN = re.compile(r"[0-9a-fA-F.:/]+")
"""Characters of an address prefix, none of which JSON escapes."""


def _size(item: Mapping[str, Any]) -> int:
    """Compact JSON length (an address row is counted without encoding it: slices hold thousands)."""
    cidr = item.get("cidr")
    if len(item) == 2 and type(item.get("identity")) is int and isinstance(cidr, str) and _PLAIN.fullmatch(cidr):
        return 3 + len(cidr)  # "…", within its identity's group
    return len(json.dumps(item, separators=(",", ":")))


def address_groups(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Address rows (cidr, identity) in the wire form of a slice's ipcache: one group per identity, in order."""
    groups: dict[int, list[str]] = {}
    for row in rows:
        groups.setdefault(row["identity"], []).append(row["cidr"])
    return [{"identity": identity, "cidrs": cidrs} for identity, cidrs in groups.items()]


def pack_slices(
    policy: str | None,
    rules: Iterable[Mapping[str, Any]],
    ipcache: list[dict[str, Any]],
    cidr_ids: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One policy's entries on a node (policy None: one identity's addresses) as slice specs (without
    nodeName) of bounded size and list lengths.

    Entries are independent (the maps hold their union), so any split is equivalent; the
    order is kept so equal inputs give equal slices.
    """
    limits = {"rules": MAX_SLICE_RULES, "ipcache": MAX_SLICE_IPCACHE, "cidrIdentities": MAX_SLICE_CIDR_IDENTITIES}
    items = [("rules", r) for rule in rules for r in split_rule(rule)]
    # Rows of one identity together (the sort is stable: their order is kept), as one group on the wire.
    items += [("ipcache", e) for e in sorted(ipcache, key=lambda row: row["identity"])]
    items += [("cidrIdentities", e) for e in cidr_ids]
    out: list[dict[str, list[Any]]] = []
    current: dict[str, list[Any]] = {key: [] for key in limits}
    used = 0
    for key, item in items:
        size = _size(item) + 1
        if key == "ipcache" and (not current[key] or current[key][-1]["identity"] != item["identity"]):
            size += 24 + len(str(item["identity"]))  # {"identity":…,"cidrs":[]}
        if used and (used + size > SLICE_BYTES or len(current[key]) >= limits[key]):
            out.append(current)
            current, used = {k: [] for k in limits}, 0
        current[key].append(item)
        used += size
    if used or not out:
        out.append(current)
    specs = []
    for part in out:
        part["ipcache"] = address_groups(part["ipcache"])
        body: dict[str, Any] = {"policy": policy} if policy is not None else {}
        body.update((k, v) for k, v in part.items() if v)
        body["contentHash"] = slice_hash(body)
        specs.append(body)
    return specs


def pack_endpoints(endpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A node's endpoints (wire form, in order) as slice specs without nodeName, MAX_SLICE_ENDPOINTS to a part."""
    specs = []
    for part in _chunks(endpoints, MAX_SLICE_ENDPOINTS):
        body: dict[str, Any] = {"endpoints": part}
        body["contentHash"] = slice_hash(body)
        specs.append(body)
    return specs
