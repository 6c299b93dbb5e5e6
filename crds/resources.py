"""The resource classes by kind, and parsing of arbitrary API objects into them."""

from __future__ import annotations

from typing import Any

from beekeeper.crds.bpfprogram import BpfProgram
from beekeeper.crds.common import Resource
from beekeeper.crds.identity import NetworkIdentity
from beekeeper.crds.names import API_VERSION
from beekeeper.crds.networkpolicy import NetworkIdentityPolicy
from beekeeper.crds.nodestate import BpfNodeState
from beekeeper.crds.policyslice import BpfPolicySlice
from beekeeper.crds.runtimesecurity import RuntimeSecurityPolicy

RESOURCES: tuple[type[Resource], ...] = (
    BpfProgram,
    NetworkIdentityPolicy,
    BpfNodeState,
    NetworkIdentity,
    BpfPolicySlice,
    RuntimeSecurityPolicy,
)
BY_KIND: dict[str, type[Resource]] = {r.names.kind: r for r in RESOURCES}


def parse_resource(obj: dict[str, Any]) -> Resource:
    """Validate a beekeeper object (e.g. a manifest or a watch event's object) into its model."""
    if obj.get("apiVersion") != API_VERSION:
        raise ValueError(f"apiVersion {obj.get('apiVersion')!r} is not {API_VERSION}")
    kind = obj.get("kind")
    if kind not in BY_KIND:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(BY_KIND)}")
    return BY_KIND[kind].model_validate(obj)
