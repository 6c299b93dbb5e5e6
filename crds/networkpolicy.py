"""NetworkIdentityPolicy: Kubernetes NetworkPolicy semantics plus explicit deny rules, enforced by eBPF.

Shared fields mean exactly what they mean in networking.k8s.io/v1 NetworkPolicy, so a
NetworkPolicy can be converted by changing apiVersion and kind. Deny rules win over allows.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, StrictInt, StrictStr, model_validator

from beekeeper.crds.common import (
    AGE_COLUMN,
    ApiModel,
    Condition,
    LabelSelector,
    PrinterColumn,
    Resource,
    cel,
    cel_str,
    condition_column,
    conditions_field,
    list_set,
    observed_generation_field,
    status_field,
    validations,
)
from beekeeper.crds.names import NETWORK_IDENTITY_POLICY

MAX_RULES = 32
MAX_PEERS = 32
MAX_PORTS = 32
MAX_EXCEPT = 16
CIDR_MAX_LENGTH = 43  # "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"

# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------

# IANA service names (RFC 6335): lowercase alphanumerics and '-', at most 15 characters,
# at least one letter, no leading, trailing or doubled '-'.
SERVICE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_SERVICE_NAME_RE = re.compile(SERVICE_NAME_PATTERN)


def _check_port(value: int | str) -> int | str:
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError("port must be between 1 and 65535")
        return value
    if len(value) > 15 or not _SERVICE_NAME_RE.match(value) or "--" in value or not re.search("[a-z]", value):
        raise ValueError(
            f"port {value!r} is not a number or an IANA service name "
            "(lowercase letters, digits and '-', at most 15 characters, at least one letter)"
        )
    return value


PORT_RULE = cel(
    "type(self) == int ? (self >= 1 && self <= 65535) : "
    f"(self.size() <= 15 && self.matches({cel_str(SERVICE_NAME_PATTERN)}) && self.matches('[a-z]')"
    " && !self.contains('--'))",
    message_expression="'port ' + (type(self) == int ? string(self) : '\"' + string(self) + '\"')"
    " + ' must be a number between 1 and 65535 or an IANA service name "
    "(lowercase letters, digits and -, at most 15 characters, at least one letter)'",
)
PORT_SCHEMA: dict[str, Any] = {"minimum": 1, "maximum": 65535, "maxLength": 15, "pattern": SERVICE_NAME_PATTERN}
"""Plain schema bounds print the offending value (`Invalid value: 70000`); CEL's errors print the schema type,
which is empty for int-or-string, so the CEL message names the value itself."""
PortValue = Annotated[StrictInt | StrictStr, AfterValidator(_check_port)]


class Protocol(StrEnum):
    """Transport protocol; same values as core/v1 Protocol."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class PolicyPort(ApiModel):
    """A port or port range (same meaning as NetworkPolicyPort)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.endPort) || has(self.port)",
                "endPort requires port",
                field_path=".endPort",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.endPort) || !has(self.port) || type(self.port) == int",
                "endPort requires a numeric port, not a named port",
                field_path=".endPort",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.endPort) || !has(self.port) || type(self.port) != int || self.endPort >= self.port",
                "endPort must be greater than or equal to port",
                field_path=".endPort",
            ),
        )
    )

    protocol: Protocol = Field(Protocol.TCP, description="TCP (default), UDP or SCTP.")
    port: PortValue | None = Field(
        None,
        description="Port number (1-65535) or name of a container port (an IANA service name, resolved per pod); "
        "absent means every port.",
        json_schema_extra={**PORT_SCHEMA, **validations(PORT_RULE)},
    )
    end_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="With a numeric port: the last port of the range port..endPort (inclusive).",
    )

    @model_validator(mode="after")
    def _range(self) -> PolicyPort:
        if self.end_port is None:
            return self
        if self.port is None:
            raise ValueError("endPort requires port")
        if not isinstance(self.port, int):
            raise ValueError("endPort requires a numeric port, not a named port")
        if self.end_port < self.port:
            raise ValueError("endPort must be greater than or equal to port")
        return self


# --------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a CIDR like the apiserver's CEL isCIDR(): a prefix length is required, host bits may be set.

    Cached (networks are immutable): a policy's ipBlocks are parsed again on every edit of it, 13 % of
    the operator's time for an edit of an 8192-entry policy.
    """
    _, slash, prefix = value.partition("/")
    if not slash:
        raise ValueError(f"{value!r} is not a CIDR: want address/prefix-length, e.g. 10.0.0.0/8")
    if not prefix.isdigit() or (len(prefix) > 1 and prefix.startswith("0")):
        raise ValueError(f"{value!r} is not a CIDR: the prefix length must be a plain decimal number")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
        raise ValueError(f"{value!r} is not a CIDR: IPv4-mapped IPv6 prefixes are not accepted, use the IPv4 form")
    return network


def _check_cidr(value: str) -> str:
    parse_cidr(value)
    return value


CIDR_RULE = cel("isCIDR(self)", "must be a CIDR, e.g. 10.0.0.0/8 or fd00::/8")
Cidr = Annotated[
    str,
    Field(min_length=1, max_length=CIDR_MAX_LENGTH, json_schema_extra=validations(CIDR_RULE)),
    AfterValidator(_check_cidr),
]


class IPBlock(ApiModel):
    """A CIDR range minus exceptions; meant for traffic to and from outside the cluster (as in NetworkPolicy)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.except) || !isCIDR(self.cidr) || self.except.all(e, !isCIDR(e) || "
                "(cidr(e).ip().family() == cidr(self.cidr).ip().family()"
                " && cidr(self.cidr).containsCIDR(e)"
                " && cidr(e).prefixLength() > cidr(self.cidr).prefixLength()))",
                "except entries must be strict subsets of cidr, of the same IP family",
                field_path=".except",
            ),
        )
    )

    cidr: Cidr = Field(description="The range, e.g. 192.168.1.0/24 or 2001:db8::/64.")
    except_: list[Cidr] | None = Field(
        None,
        alias="except",
        max_length=MAX_EXCEPT,
        description="Sub-ranges of cidr that are not part of the block; each must lie strictly inside cidr.",
    )

    @model_validator(mode="after")
    def _except_inside(self) -> IPBlock:
        outer = parse_cidr(self.cidr)
        for entry in self.except_ or []:
            inner = parse_cidr(entry)
            if (
                inner.version != outer.version
                or not inner.subnet_of(outer)  # type: ignore[arg-type]
                or inner.prefixlen <= outer.prefixlen
            ):
                raise ValueError(f"except entry {entry} must be a strict subset of cidr {self.cidr}, same IP family")
        return self


class Peer(ApiModel):
    """Who is on the other side: pods by labels (optionally in namespaces by labels), or an IP block.

    podSelector alone selects pods in the policy's namespace; namespaceSelector alone selects
    every pod in the matching namespaces; both together select matching pods in matching namespaces.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)",
                "a peer needs podSelector, namespaceSelector or ipBlock",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.ipBlock) || !(has(self.podSelector) || has(self.namespaceSelector))",
                "ipBlock cannot be combined with podSelector or namespaceSelector",
                field_path=".ipBlock",
                reason="FieldValueForbidden",
            ),
        )
    )

    pod_selector: LabelSelector | None = Field(None, description="Pods by label; {} selects every pod.")
    namespace_selector: LabelSelector | None = Field(None, description="Namespaces by label; {} selects every one.")
    ip_block: IPBlock | None = Field(None, description="An IP range; exclusive with the selectors.")

    @model_validator(mode="after")
    def _shape(self) -> Peer:
        if self.pod_selector is None and self.namespace_selector is None and self.ip_block is None:
            raise ValueError("a peer needs podSelector, namespaceSelector or ipBlock")
        if self.ip_block is not None and (self.pod_selector is not None or self.namespace_selector is not None):
            raise ValueError("ipBlock cannot be combined with podSelector or namespaceSelector")
        return self


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------

_PORTS_DESCRIPTION = "Ports the rule applies to (any of them); empty or absent means every port and protocol."


class IngressRule(ApiModel):
    """Traffic into the selected pods that matches any source in `from` and any port in `ports`."""

    from_: list[Peer] | None = Field(
        None,
        alias="from",
        max_length=MAX_PEERS,
        description="Sources (any of them); empty or absent means every source.",
    )
    ports: list[PolicyPort] | None = Field(None, max_length=MAX_PORTS, description=_PORTS_DESCRIPTION)


class EgressRule(ApiModel):
    """Traffic out of the selected pods that matches any destination in `to` and any port in `ports`."""

    to: list[Peer] | None = Field(
        None,
        max_length=MAX_PEERS,
        description="Destinations (any of them); empty or absent means every destination.",
    )
    ports: list[PolicyPort] | None = Field(None, max_length=MAX_PORTS, description=_PORTS_DESCRIPTION)


class PolicyType(StrEnum):
    """A traffic direction a policy isolates."""

    INGRESS = "Ingress"
    EGRESS = "Egress"


class NetworkIdentityPolicySpec(ApiModel):
    """Which pods the policy selects and which traffic it allows or denies for them."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.policyTypes) || size(self.policyTypes) == 0 || !has(self.ingressDeny)"
                " || 'Ingress' in self.policyTypes",
                "ingressDeny requires Ingress in policyTypes",
                field_path=".ingressDeny",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.policyTypes) || size(self.policyTypes) == 0 || !has(self.egressDeny)"
                " || 'Egress' in self.policyTypes",
                "egressDeny requires Egress in policyTypes",
                field_path=".egressDeny",
                reason="FieldValueForbidden",
            ),
        )
    )

    pod_selector: LabelSelector = Field(
        description="Pods in this namespace the policy applies to; {} selects every pod in the namespace."
    )
    policy_types: list[PolicyType] | None = Field(
        None,
        max_length=2,
        description="Directions the selected pods are isolated in (default-deny except what is allowed). Default: "
        "Ingress, plus Egress when egress or egressDeny rules are present (as NetworkPolicy).",
        json_schema_extra=list_set(),
    )
    ingress: list[IngressRule] | None = Field(
        None, max_length=MAX_RULES, description="Allowed incoming traffic (union of the rules)."
    )
    egress: list[EgressRule] | None = Field(
        None, max_length=MAX_RULES, description="Allowed outgoing traffic (union of the rules)."
    )
    ingress_deny: list[IngressRule] | None = Field(
        None,
        max_length=MAX_RULES,
        description="Denied incoming traffic; wins over any allow, from this or another policy.",
    )
    egress_deny: list[EgressRule] | None = Field(
        None,
        max_length=MAX_RULES,
        description="Denied outgoing traffic; wins over any allow, from this or another policy.",
    )

    @model_validator(mode="after")
    def _deny_needs_direction(self) -> NetworkIdentityPolicySpec:
        if self.policy_types:
            if self.ingress_deny is not None and PolicyType.INGRESS not in self.policy_types:
                raise ValueError("ingressDeny requires Ingress in policyTypes")
            if self.egress_deny is not None and PolicyType.EGRESS not in self.policy_types:
                raise ValueError("egressDeny requires Egress in policyTypes")
            if len(set(self.policy_types)) != len(self.policy_types):
                raise ValueError("policyTypes must not repeat a direction")
        return self

    def effective_policy_types(self) -> list[PolicyType]:
        """policyTypes as NetworkPolicy defaults it: Ingress always, Egress when there are egress rules."""
        if self.policy_types:
            return list(self.policy_types)
        types = [PolicyType.INGRESS]
        if self.egress or self.egress_deny:
            types.append(PolicyType.EGRESS)
        return types


class NetworkIdentityPolicyStatus(ApiModel):
    """Observed state, written by the operator."""

    observed_generation: int = observed_generation_field()
    conditions: list[Condition] | None = conditions_field(
        ["Valid", "Ready", "Reconciling", "Stalled"],
        "Reconciling (nodes still converging) and Stalled (invalid, or refused by the API) are for kstatus "
        "(Flux, kpt); Ready is for `kubectl wait`.",
    )
    selected_endpoints: int | None = Field(None, ge=0, description="Pods currently selected by podSelector.")
    nodes_enforcing: int | None = Field(
        None, ge=0, description="Nodes whose datapath enforces the current generation for selected pods."
    )


class NetworkIdentityPolicy(Resource):
    """NetworkIdentityPolicy controls pod traffic by label-derived identities, enforced in eBPF on each node.

    A superset of NetworkPolicy: the same podSelector, policyTypes, ingress and egress, plus
    ingressDeny and egressDeny rules that win over allows.
    """

    names: ClassVar = NETWORK_IDENTITY_POLICY
    printer_columns: ClassVar = (
        condition_column("Valid", "Valid", "Whether the policy was accepted"),
        condition_column("Ready", "Ready", "Whether every node enforces the current generation"),
        PrinterColumn("Endpoints", ".status.selectedEndpoints", "integer", "Pods selected by podSelector"),
        PrinterColumn("Nodes", ".status.nodesEnforcing", "integer", "Nodes enforcing the policy"),
        condition_column(
            "Reason", "Ready", "Why it is (not) ready, e.g. NodesNotEnforcing", field="reason", priority=1
        ),
        PrinterColumn("Types", ".spec.policyTypes", "string", "Directions isolated, when given", 1),
        AGE_COLUMN,
    )

    kind: Literal["NetworkIdentityPolicy"] = Field("NetworkIdentityPolicy", description="NetworkIdentityPolicy")
    spec: NetworkIdentityPolicySpec = Field(description="Selected pods and their allowed and denied traffic.")
    status: NetworkIdentityPolicyStatus | None = status_field("Observed state, written by the operator.")
