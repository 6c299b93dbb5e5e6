"""beekeeper's API: typed models (the source of truth) and the CRDs generated from them.

Only the cheap name constants live at package level; import the models from their modules
(`beekeeper.crds.bpfprogram`, `.networkpolicy`, `.nodestate`) and the manifests from
`beekeeper.crds.generate`.
"""

from beekeeper.crds.names import (
    API_VERSION,
    BPF_NODE_STATE,
    BPF_NODE_STATE_KIND,
    BPF_NODE_STATE_PLURAL,
    BPF_PROGRAM,
    BPF_PROGRAM_KIND,
    BPF_PROGRAM_PLURAL,
    CATEGORY,
    GROUP,
    NETWORK_IDENTITY_POLICY,
    NETWORK_IDENTITY_POLICY_KIND,
    NETWORK_IDENTITY_POLICY_PLURAL,
    VERSION,
    ResourceNames,
)

__all__ = [
    "API_VERSION",
    "BPF_NODE_STATE",
    "BPF_NODE_STATE_KIND",
    "BPF_NODE_STATE_PLURAL",
    "BPF_PROGRAM",
    "BPF_PROGRAM_KIND",
    "BPF_PROGRAM_PLURAL",
    "CATEGORY",
    "GROUP",
    "NETWORK_IDENTITY_POLICY",
    "NETWORK_IDENTITY_POLICY_KIND",
    "NETWORK_IDENTITY_POLICY_PLURAL",
    "VERSION",
    "ResourceNames",
]
