"""BpfNodeState: everything one node must run (spec, by the operator) and how it went (status, by its daemon).

One object per node keeps writes conflict-free and bounded: the operator is the only
writer of spec, that node's daemon the only writer of status.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from beekeeper.crds.bpfprogram import (
    MAX_GLOBAL_DATA,
    MAX_INLINE_SOURCE,
    MAX_METRICS,
    MAX_PROGRAMS,
    CFlag,
    GlobalData,
    Metric,
    Program,
)
from beekeeper.crds.common import (
    AGE_COLUMN,
    BASE64_PATTERN,
    ApiModel,
    Condition,
    DnsLabel,
    DnsSubdomain,
    PrinterColumn,
    Resource,
    Time,
    atomic_list,
    cel,
    condition_column,
    conditions_field,
    list_map,
    validations,
)
from beekeeper.crds.names import BPF_NODE_STATE
from beekeeper.crds.networkpolicy import PolicyType, parse_cidr
from beekeeper.crds.runtimesecurity import MAX_RULES, DefaultAction, PolicyMode, RuntimeRule

MAX_NODE_BPF_PROGRAMS = 128
CONTENT_HASH_PATTERN = r"^[a-f0-9]{64}$"
POLICY_REF_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

ContentHash = Annotated[str, Field(min_length=64, max_length=64, pattern=CONTENT_HASH_PATTERN)]


MAX_BYTECODE = 256 * 1024
"""Bytes of an object carried in a BpfNodeState (base64 on the wire; larger ones belong in an image)."""


def content_hash(
    source: str | None,
    cflags: Sequence[str] | None,
    programs: Sequence[Program],
    bytecode_sha256: str | None = None,
    global_data: Mapping[str, str] | None = None,
) -> str:
    """sha256 over what decides the loaded code: the resolved source (or the object's sha256 and
    globalData), cflags and program entries.

    The operator writes it into spec and the daemon echoes it in status, so "is this node
    running what it should" is a string comparison, and an unchanged hash means no reload.
    Source programs hash exactly as before bytecode existed, so an upgrade reloads nothing.
    """
    doc: dict[str, Any] = {"cflags": list(cflags or []), "programs": [p.to_dict() for p in programs]}
    if source is not None:
        doc["source"] = source
    if bytecode_sha256 is not None:
        doc["bytecode"] = bytecode_sha256
        doc["globalData"] = dict(global_data or {})
    canonical = json.dumps(
        doc,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Spec: programs
# --------------------------------------------------------------------------------------


PINNED_IMAGE_PATTERN = r"^[^@\s]+@sha256:[a-f0-9]{64}$"


class NodeBytecode(ApiModel):
    """A CO-RE object resolved for this node: inline, or an image pinned by digest that the node pulls."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel("has(self.object) != has(self.image)", "exactly one of object or image"))
    )

    object: str | None = Field(
        None,
        min_length=4,
        max_length=(MAX_BYTECODE + 2) // 3 * 4,
        description="The ELF object, base64 (read from the BpfProgram's ConfigMap binaryData). Exclusive with image.",
        pattern=BASE64_PATTERN,
    )
    image: str | None = Field(
        None,
        max_length=600,
        pattern=PINNED_IMAGE_PATTERN,
        description="The OCI image holding the object, always pinned by digest (the operator resolves tags), "
        "pulled and cached by the node. Exclusive with object.",
    )
    sha256: ContentHash = Field(description="sha256 of the object's bytes, hex; for an image, of its manifest.")

    @model_validator(mode="after")
    def _exactly_one(self) -> NodeBytecode:
        if (self.object is None) == (self.image is None):
            raise ValueError("exactly one of object or image must be set")
        return self


class NodeProgram(ApiModel):
    """One BpfProgram resolved for this node: the code is inlined so the node needs nothing else."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.source) != has(self.bytecode)", "exactly one of source or bytecode must be set")
        )
    )

    bpf_program: DnsSubdomain = Field(description="Name of the BpfProgram this comes from.")
    uid: str = Field(min_length=1, max_length=64, description="metadata.uid of that BpfProgram.")
    generation: int = Field(ge=1, description="metadata.generation of that BpfProgram the entry was resolved from.")
    content_hash: ContentHash = Field(description="sha256 of source, cflags and programs; unchanged means no reload.")
    source: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_INLINE_SOURCE,
        description="The C source, resolved from inline or a ConfigMap. Exclusive with bytecode.",
    )
    bytecode: NodeBytecode | None = Field(None, description="The CO-RE object. Exclusive with source.")
    global_data: GlobalData = Field(
        None, max_length=MAX_GLOBAL_DATA, description="bytecode: global variable values, as in the BpfProgram."
    )
    cflags: list[CFlag] | None = Field(None, max_length=32, description="Extra compiler flags for bcc.")
    programs: list[Program] = Field(
        min_length=1,
        max_length=MAX_PROGRAMS,
        description="Functions to load and attach, as in the BpfProgram.",
        json_schema_extra=list_map("name"),
    )
    metrics: list[Metric] | None = Field(
        None,
        max_length=MAX_METRICS,
        description="Maps to export as Prometheus metrics, as in the BpfProgram.",
        json_schema_extra=list_map("name"),
    )

    @model_validator(mode="after")
    def _exactly_one_code(self) -> NodeProgram:
        if (self.source is None) == (self.bytecode is None):
            raise ValueError("exactly one of source or bytecode must be set")
        return self

    def expected_hash(self) -> str:
        sha = self.bytecode.sha256 if self.bytecode else None
        return content_hash(self.source, self.cflags, self.programs, sha, self.global_data)


# --------------------------------------------------------------------------------------
# Spec: network policy datapath (revised with the NetworkIdentityPolicy implementation)
# --------------------------------------------------------------------------------------


def _check_ip(value: str) -> str:
    """As CEL's isIP(): canonical-enough text, no zone, no IPv4-mapped IPv6 (the apiserver rejects those)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    if "%" in value or (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None):
        raise ValueError(f"{value!r} is not an IP address (no zones, no IPv4-mapped IPv6)")
    return value


def check_prefix(value: str) -> str:
    """A prefix in canonical form (network address, shortest text): one spelling per prefix, so list keys are unique."""
    network = parse_cidr(value)
    if str(network) != value:
        raise ValueError(f"{value!r} is not a canonical prefix: write {network}")
    return value


IP_RULE = cel("isIP(self)", message_expression="'must be an IP address, not ' + self")
PREFIX_RULE = cel(
    "isCIDR(self) && string(cidr(self).masked()) == self",
    message_expression="'must be a canonical prefix (network address/length, e.g. 10.244.1.7/32), not ' + self",
)
IpAddress = Annotated[
    str, Field(min_length=2, max_length=45, json_schema_extra=validations(IP_RULE)), AfterValidator(_check_ip)
]
PrefixString = Annotated[
    str, Field(min_length=3, max_length=49, json_schema_extra=validations(PREFIX_RULE)), AfterValidator(check_prefix)
]
Identity = Annotated[int, Field(ge=0, le=2**32 - 1)]
LocalIdentity = Annotated[int, Field(ge=1, le=2**32 - 1)]
"""An endpoint's identity: 0 means "any peer" in policy keys and can never be a pod's."""


class Endpoint(ApiModel):
    """A pod on this node: its identity and whether policies isolate it per direction.

    The daemon finds the pod's host-side interface itself, from the host route to `ip`
    (the state any CNI plugin leaves), so no CNI-specific hint is needed.
    """

    namespace: DnsLabel = Field(description="Namespace of the pod.")
    pod: DnsSubdomain = Field(description="Name of the pod.")
    ip: IpAddress = Field(description="Pod IP (status.podIP).")
    identity: LocalIdentity = Field(
        description="Numeric identity of the pod's label set (with its namespace's labels); never 0."
    )
    ingress_enforced: bool = Field(
        False, description="Some policy selects the pod for Ingress: inbound traffic is denied unless allowed."
    )
    egress_enforced: bool = Field(
        False, description="Some policy selects the pod for Egress: outbound traffic is denied unless allowed."
    )


class IpcacheEntry(ApiModel):
    """IP prefix to identity, for the datapath's longest-prefix-match lookup of a packet's peer."""

    cidr: PrefixString = Field(description="Prefix in canonical form, e.g. 10.244.1.7/32 for a pod.")
    identity: Identity = Field(description="Identity of the prefix: a pod identity, or 1 for a node (host) address.")


class PolicyAction(StrEnum):
    """What the datapath does with a matching flow; deny wins over allow."""

    ALLOW = "allow"
    DENY = "deny"


class RuleProtocol(StrEnum):
    """Transport protocol of a rule; Any matches every protocol (and then ports must be any)."""

    ANY = "Any"
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


def port_range_rules() -> dict[str, Any]:
    """CEL for (protocol, portStart, portEnd): an ordered range, and no ports without a port protocol."""
    return validations(
        cel(
            "!has(self.portStart) || !has(self.portEnd) || self.portStart <= self.portEnd",
            "portEnd must be greater than or equal to portStart",
            field_path=".portEnd",
        ),
        cel(
            "!has(self.protocol) || self.protocol != 'Any' || ((!has(self.portStart) || self.portStart == 0)"
            " && (!has(self.portEnd) || self.portEnd == 0))",
            "a rule for protocol Any cannot restrict ports (portStart and portEnd must be 0)",
            field_path=".protocol",
            reason="FieldValueForbidden",
        ),
    )


def check_port_range(protocol: RuleProtocol, start: int, end: int) -> None:
    if start > end:
        raise ValueError(f"portEnd {end} must be greater than or equal to portStart {start}")
    if protocol == RuleProtocol.ANY and (start or end):
        raise ValueError("a rule for protocol Any cannot restrict ports (portStart and portEnd must be 0)")


class PolicyRule(ApiModel):
    """One resolved policy entry: (local identity, direction, peer identity, protocol, ports) -> action.

    Keyed by identities, not pods: every local pod with the same labels shares the entry,
    so pod churn changes only endpoints and ipcache.
    """

    model_config = ConfigDict(json_schema_extra=port_range_rules())

    local_identity: LocalIdentity = Field(description="Identity of the local endpoints the rule applies to; never 0.")
    direction: PolicyType = Field(description="Ingress (into the local endpoint) or Egress (out of it).")
    peer_identity: Identity = Field(
        description="Identity of the peer: a pod identity, a CIDR identity (cidrIdentities), 1 host, 2 world, 0 any."
    )
    protocol: RuleProtocol = Field(RuleProtocol.ANY, description="TCP, UDP, SCTP or Any.")
    port_start: int = Field(0, ge=0, le=65535, description="First destination port; 0 with portEnd 0 means any port.")
    port_end: int = Field(0, ge=0, le=65535, description="Last destination port (inclusive).")
    action: PolicyAction = Field(description="allow or deny; deny wins.")
    policy: str = Field(
        max_length=317, pattern=POLICY_REF_PATTERN, description="namespace/name of the NetworkIdentityPolicy."
    )

    @model_validator(mode="after")
    def _ports(self) -> PolicyRule:
        check_port_range(self.protocol, self.port_start, self.port_end)
        return self


MAX_NODE_SLICES = 4096
MAX_INLINE_ENTRIES = 4096
"""Inline lists are small by design (bulk entries travel in slices); the bound also keeps CEL cheap."""


class SliceRef(ApiModel):
    """One BpfPolicySlice this node must enforce, pinned to the content it must have."""

    name: DnsSubdomain = Field(description="metadata.name of the BpfPolicySlice.")
    content_hash: ContentHash = Field(
        description="spec.contentHash the slice must carry; until it does, the daemon keeps the maps as they are."
    )


def check_unique(items: Sequence[Any] | None, key: str, what: str) -> None:
    """Unique keys: what the apiserver checks for a list-map, and only the model for an atomic list."""
    seen: set[Any] = set()
    for item in items or []:
        value = getattr(item, key)
        if value in seen:
            raise ValueError(f"{what}: {value} is listed twice")
        seen.add(value)


NETWORK_POLICY_FIELDS = ("endpoints", "ipcache", "cidrIdentities", "rules", "slices")
"""spec.networkPolicy lists; the operator writes all of them (a merge patch replaces only what it names)."""


class NodeNetworkPolicy(ApiModel):
    """Desired contents of this node's policy maps, computed by the operator.

    The node's own addresses are inline; its endpoints and what each policy adds live in
    BpfPolicySlices listed in `slices`, so no policy's size bounds another's, and a change
    elsewhere rewrites a short list of refs, not the node's pods. The maps hold the union.
    """

    endpoints: list[Endpoint] | None = Field(
        None,
        max_length=4096,
        description="Local pods and their identities, inline (the operator lists them in endpoint slices).",
    )
    ipcache: list[IpcacheEntry] | None = Field(
        None,
        max_length=MAX_INLINE_ENTRIES,
        description="Addresses with their identities (the operator puts the node's own here, as host); "
        "these win over the slices'.",
        json_schema_extra=list_map("cidr"),
    )
    cidr_identities: list[IpcacheEntry] | None = Field(
        None,
        max_length=MAX_INLINE_ENTRIES,
        description="One identity per distinct ipBlock prefix (cidr or except); the most specific prefix "
        "containing an address (here or in a slice) gives its CIDR identity.",
        json_schema_extra=list_map("cidr"),
    )
    rules: list[PolicyRule] | None = Field(
        None,
        max_length=MAX_INLINE_ENTRIES,
        description="Policy entries for local identities, inline (the operator writes them into slices).",
    )
    slices: list[SliceRef] | None = Field(
        None,
        max_length=MAX_NODE_SLICES,
        description="BpfPolicySlices holding the per-policy entries of this node; all of them are applied together.",
        json_schema_extra=atomic_list(),
    )
    revision: ContentHash | None = Field(
        None,
        description="sha256 of the lists above (so of the slices' names and contentHashes too), set by the "
        "operator; the daemon echoes it as status.networkPolicy.observedRevision once its maps hold them, "
        "slices included (a change of programs alone moves metadata.generation, not this).",
    )

    @model_validator(mode="after")
    def _unique(self) -> NodeNetworkPolicy:
        check_unique(self.ipcache, "cidr", "ipcache")
        check_unique(self.cidr_identities, "cidr", "cidrIdentities")
        check_unique(self.slices, "name", "slices")
        return self


def policy_revision(network_policy: Mapping[str, Any]) -> str:
    """sha256 over the wire form of spec.networkPolicy's lists (revision excluded)."""
    canonical = json.dumps(
        {k: v for k, v in network_policy.items() if k != "revision"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Spec: runtime security (RuntimeSecurityPolicy)
# --------------------------------------------------------------------------------------

MAX_NODE_RUNTIME_POLICIES = 256
MAX_NODE_PODS = 512
CONTAINER_ID_PATTERN = r"^[a-z0-9-]{1,32}://[a-f0-9]{1,128}$"


class RuntimeContainer(ApiModel):
    """One running container of a selected pod, as its pod status names it."""

    name: DnsLabel = Field(description="Container name.")
    container_id: str = Field(
        max_length=161,
        pattern=CONTAINER_ID_PATTERN,
        description="status.containerStatuses[].containerID, e.g. containerd://<64 hex>; the daemon finds the "
        "container's cgroup and processes by it.",
    )


class RuntimePod(ApiModel):
    """A local pod a runtime policy selects, with the containers it applies to."""

    namespace: DnsLabel = Field(description="Namespace of the pod.")
    pod: DnsSubdomain = Field(description="Name of the pod.")
    uid: str = Field(min_length=1, max_length=64, description="metadata.uid (the kubelet names the pod cgroup by it).")
    containers: list[RuntimeContainer] = Field(
        max_length=64, description="Running containers selected (spec.containers of the policy narrows them)."
    )


class NodeRuntimePolicy(ApiModel):
    """One RuntimeSecurityPolicy as this node must enforce it: its rules and its local pods."""

    policy: str = Field(max_length=317, pattern=POLICY_REF_PATTERN, description="namespace/name of the policy.")
    generation: int = Field(ge=1, description="metadata.generation of the policy this entry was compiled from.")
    mode: PolicyMode = Field(description="Enforce or Audit.")
    default_action: DefaultAction | None = Field(None, description="As in the policy: Block or Audit the rest.")
    rules: list[RuntimeRule] = Field(
        min_length=1, max_length=MAX_RULES, description="As in the policy.", json_schema_extra=list_map("name")
    )
    pods: list[RuntimePod] | None = Field(None, max_length=MAX_NODE_PODS, description="Selected pods on this node.")


class NodeRuntimeSecurity(ApiModel):
    """Desired contents of this node's runtime-security maps; present while some valid policy exists."""

    policies: list[NodeRuntimePolicy] | None = Field(
        None,
        max_length=MAX_NODE_RUNTIME_POLICIES,
        description="Policies selecting pods on this node.",
        json_schema_extra=list_map("policy"),
    )
    revision: ContentHash | None = Field(
        None,
        description="sha256 of policies, set by the operator; the daemon echoes it as "
        "status.runtimeSecurity.observedRevision once its maps hold them.",
    )


class BpfNodeStateSpec(ApiModel):
    """Everything the node must run; written by the operator only."""

    node_name: DnsSubdomain = Field(
        description="The node this state is for; equals metadata.name.",
        json_schema_extra=validations(cel("self == oldSelf", "nodeName is immutable")),
    )
    programs: list[NodeProgram] | None = Field(
        None,
        max_length=MAX_NODE_BPF_PROGRAMS,
        description="BpfPrograms selecting this node, resolved.",
        json_schema_extra=list_map("bpfProgram"),
    )
    network_policy: NodeNetworkPolicy | None = Field(
        None, description="Endpoints, identities and policy entries for the NetworkIdentityPolicy datapath."
    )
    runtime_security: NodeRuntimeSecurity | None = Field(
        None, description="Local pods and exec rules for the RuntimeSecurityPolicy datapath."
    )


# --------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------


class KernelCapabilities(ApiModel):
    """What this node's kernel can do, probed by the daemon at start."""

    kernel_version: str | None = Field(None, max_length=256, description="uname -r, e.g. 6.8.0-45-generic.")
    btf: bool | None = Field(None, description="Whether kernel BTF (/sys/kernel/btf/vmlinux) is available.")
    program_types: dict[str, bool] | None = Field(
        None, description="Program type (as in BpfProgram programs[].type) to whether it can be loaded here."
    )
    reasons: dict[str, str] | None = Field(
        None, description="Program type to why it is not supported, e.g. kprobes disabled in this kernel."
    )
    exec_enforcement: str | None = Field(
        None,
        max_length=64,
        description="The hook RuntimeSecurityPolicy uses here: lsm (bprm_check_security, the exec fails with "
        "EPERM) or tracepoint (sched_process_exec + SIGKILL before the program's first instruction).",
    )
    xdp_multi_program: bool | None = Field(
        None,
        description="Whether one interface can run several XDP programs (libxdp's multi-program dispatcher, "
        "which needs freplace extension programs); without it the second XDP program on an interface is "
        "UnsupportedOnNode.",
    )
    xdp_multi_program_reason: str | None = Field(
        None, max_length=2048, description="Why xdpMultiProgram is false: the kernel's answer to the probe."
    )


class ProgramPhase(StrEnum):
    """Where one function is in its life on the node."""

    PENDING = "Pending"
    COMPILING = "Compiling"
    LOADED = "Loaded"
    ATTACHED = "Attached"
    FAILED = "Failed"


class ProgramStatus(ApiModel):
    """The state of one function of one BpfProgram on this node."""

    bpf_program: DnsSubdomain = Field(description="Name of the BpfProgram.")
    name: str = Field(max_length=64, description="Function name, as in programs[].name.")
    content_hash: ContentHash | None = Field(None, description="contentHash of the spec entry this describes.")
    phase: ProgramPhase = Field(description="Pending, Compiling, Loaded, Attached or Failed.")
    program_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=256, description="Kernel program ids (bpftool prog show id N)."
    )
    attach_points: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None, max_length=256, description="Where it is attached, e.g. xdp/eth0, tracepoint/raw_syscalls:sys_enter."
    )
    reason: str | None = Field(
        None, max_length=128, description="CamelCase cause when Failed, e.g. CompileError, VerifierRejected."
    )
    message: str | None = Field(
        None, max_length=4096, description="Details when Failed: compiler error, verifier log excerpt."
    )
    last_transition_time: Time | None = Field(None, description="When phase last changed.")
    warnings: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None,
        max_length=MAX_METRICS,
        description="Problems that do not stop the BpfProgram from running, e.g. a metric not exported because its "
        "map does not exist or its name is taken; on the entry of the BpfProgram's first function.",
    )


class NetworkPolicyStatus(ApiModel):
    """How this node's policy datapath matches spec.networkPolicy."""

    enforcing: bool = Field(False, description="The datapath is loaded and every resolvable endpoint is attached.")
    endpoints: int = Field(
        0,
        ge=0,
        description="Local endpoints in spec and its endpoint slices (only the inline ones where the datapath is "
        "disabled: that daemon reads no slices).",
    )
    attached: int = Field(0, ge=0, description="Endpoints whose host-side interface carries the policy programs.")
    missing: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=64, description="Endpoint IPs with no host route to an interface yet (up to 64)."
    )
    rules: int = Field(0, ge=0, description="Policy rules in the maps.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation last synced into the maps.")
    observed_revision: ContentHash | None = Field(
        None, description="spec.networkPolicy.revision last synced into the maps."
    )
    last_sync_time: Time | None = Field(None, description="When the maps were last changed.")
    message: str | None = Field(None, max_length=2048, description="Why the datapath is not enforcing, if it is not.")


class RuntimeSecurityStatus(ApiModel):
    """How this node's runtime-security datapath matches spec.runtimeSecurity."""

    enforcing: bool = Field(False, description="The hook is attached and every selected container is in the maps.")
    hook: str | None = Field(None, max_length=64, description="lsm or tracepoint (see capabilities.execEnforcement).")
    containers: int = Field(0, ge=0, description="Selected containers found and mapped to kernel identities.")
    missing: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None, max_length=64, description="namespace/pod/container not found on the node yet (up to 64)."
    )
    observed_revision: ContentHash | None = Field(
        None, description="spec.runtimeSecurity.revision last synced into the maps."
    )
    matches: dict[str, int] | None = Field(
        None, description="Policy (namespace/name) -> execs it matched on this node since the daemon started."
    )
    message: str | None = Field(None, max_length=2048, description="Why it is not enforcing, if it is not.")


class BpfNodeStateStatus(ApiModel):
    """What the node actually runs; written by that node's daemon only."""

    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this status describes.")
    conditions: list[Condition] | None = conditions_field(["Ready"])
    capabilities: KernelCapabilities | None = Field(None, description="Kernel capabilities of the node.")
    programs: list[ProgramStatus] | None = Field(
        None,
        max_length=MAX_NODE_BPF_PROGRAMS * MAX_PROGRAMS,
        description="One entry per function of every BpfProgram in spec.",
        json_schema_extra=list_map("bpfProgram", "name"),
    )
    attached: str | None = Field(
        None, max_length=32, description="Attached functions / functions in spec, e.g. 3/4 (for kubectl get)."
    )
    network_policy: NetworkPolicyStatus | None = Field(None, description="State of the policy datapath.")
    runtime_security: RuntimeSecurityStatus | None = Field(None, description="State of the runtime-security datapath.")


class BpfNodeState(Resource):
    """BpfNodeState is one node's desired eBPF state (spec, from the operator) and actual state (status, from
    the node daemon). Named after the node; not meant to be edited by hand.
    """

    names: ClassVar = BPF_NODE_STATE
    printer_columns: ClassVar = (
        PrinterColumn("Programs", ".status.attached", "string", "Attached functions / functions in spec"),
        condition_column("Ready", "Ready", "Whether the node runs everything in spec"),
        PrinterColumn("Kernel", ".status.capabilities.kernelVersion", "string", "Kernel release of the node"),
        condition_column("Reason", "Ready", "Why it is or is not ready", 1, "reason"),
        PrinterColumn(
            "Policy", ".status.networkPolicy.enforcing", "boolean", "Whether the policy datapath enforces", 1
        ),
        AGE_COLUMN,
    )
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.metadata.name == self.spec.nodeName",
                "spec.nodeName must equal metadata.name",
                field_path=".spec.nodeName",
            )
        )
    )

    kind: Literal["BpfNodeState"] = Field("BpfNodeState", description="BpfNodeState")
    spec: BpfNodeStateSpec = Field(description="Desired state of the node, written by the operator.")
    status: BpfNodeStateStatus | None = Field(None, description="Actual state of the node, written by its daemon.")

    @model_validator(mode="after")
    def _named_after_node(self) -> BpfNodeState:
        if self.metadata.name is not None and self.metadata.name != self.spec.node_name:
            raise ValueError("spec.nodeName must equal metadata.name")
        return self
