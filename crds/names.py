"""API group, version and resource names, importable without pulling in the models."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "beekeeper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "beekeeper"


@dataclass(frozen=True)
class ResourceNames:
    """The names one CRD is known by; the generator and every client read them from here."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


BPF_PROGRAM = ResourceNames(
    kind="BpfProgram",
    plural="bpfprograms",
    singular="bpfprogram",
    short_names=("bpfprog", "bpfp"),
    namespaced=False,
)
NETWORK_IDENTITY_POLICY = ResourceNames(
    kind="NetworkIdentityPolicy",
    plural="networkidentitypolicies",
    singular="networkidentitypolicy",
    short_names=("nip",),
    namespaced=True,
)
BPF_NODE_STATE = ResourceNames(
    kind="BpfNodeState",
    plural="bpfnodestates",
    singular="bpfnodestate",
    short_names=("bns",),
    namespaced=False,
)

NETWORK_IDENTITY = ResourceNames(
    kind="NetworkIdentity",
    plural="networkidentities",
    singular="networkidentity",
    short_names=("nid",),
    namespaced=False,
)
BPF_POLICY_SLICE = ResourceNames(
    kind="BpfPolicySlice",
    plural="bpfpolicyslices",
    singular="bpfpolicyslice",
    short_names=("bps",),
    namespaced=False,
)
RUNTIME_SECURITY_POLICY = ResourceNames(
    kind="RuntimeSecurityPolicy",
    plural="runtimesecuritypolicies",
    singular="runtimesecuritypolicy",
    short_names=("rsp",),
    namespaced=True,
)

ALL_RESOURCES = (
    BPF_PROGRAM,
    NETWORK_IDENTITY_POLICY,
    BPF_NODE_STATE,
    NETWORK_IDENTITY,
    BPF_POLICY_SLICE,
    RUNTIME_SECURITY_POLICY,
)

# Flat aliases for call sites that only need one string (CustomObjectsApi).
BPF_PROGRAM_PLURAL = BPF_PROGRAM.plural
NETWORK_IDENTITY_POLICY_PLURAL = NETWORK_IDENTITY_POLICY.plural
BPF_NODE_STATE_PLURAL = BPF_NODE_STATE.plural
NETWORK_IDENTITY_PLURAL = NETWORK_IDENTITY.plural
BPF_POLICY_SLICE_PLURAL = BPF_POLICY_SLICE.plural
RUNTIME_SECURITY_POLICY_PLURAL = RUNTIME_SECURITY_POLICY.plural
