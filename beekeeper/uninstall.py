"""`beekeeper uninstall-cleanup`: detach everything from every node before the chart goes away.

The chart runs this as a helm pre-delete hook, so it runs on `helm uninstall` only, never on an
upgrade (a rolling upgrade keeps every program attached; the daemons re-adopt their pins). While
the operator and the node daemons are still running it deletes every BpfProgram and
NetworkIdentityPolicy, and waits until each is gone (the operator's finalizer holds a BpfProgram
until no node reports it) and every node's BpfNodeState reports nothing attached for its current
spec. Only then may the daemons go: no program is left running in a node's kernel with nothing
managing it. A node whose daemon cannot detach (down, unreachable) fails the uninstall with its
name after the timeout, rather than leaving its programs behind silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

from kubernetes import client
from kubernetes.client.rest import ApiException

from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_POLICY_PLURAL,
    RUNTIME_SECURITY_POLICY_PLURAL,
    VERSION,
)

log = logging.getLogger(__name__)

Object = Mapping[str, Any]


def attached_on(nodestate: Object) -> str | None:
    """Why this node may still run something of beekeeper's, or None once it reports nothing for its spec."""
    meta, spec, status = nodestate["metadata"], nodestate.get("spec") or {}, nodestate.get("status") or {}
    name = meta["name"]
    programs = status.get("programs") or []
    if programs:
        shown = sorted({p.get("bpfProgram", "?") for p in programs})
        return f"node {name} still reports {len(programs)} program(s) of {', '.join(shown[:5])}"
    if status.get("networkPolicy"):
        return f"node {name} still reports the policy datapath"
    if spec.get("programs") or spec.get("networkPolicy"):
        return f"node {name} has not been told to detach yet"
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    if status and observed is not None and generation is not None and observed < generation:
        return f"node {name} has not caught up with its spec (generation {generation}, observed {observed})"
    return None


def pending(programs: list[Object], policies: list[Object], nodestates: list[Object]) -> list[str]:
    """What the uninstall still waits for; empty when nothing of beekeeper's is attached anywhere."""
    waiting = [f"BpfProgram {p['metadata']['name']} is being detached" for p in programs]
    waiting += [
        f"NetworkIdentityPolicy {p['metadata']['namespace']}/{p['metadata']['name']} is being deleted" for p in policies
    ]
    return waiting + [why for state in nodestates if (why := attached_on(state)) is not None]


def cleanup(
    api: client.ApiClient,
    timeout: float = 240.0,
    progress: Callable[[str], None] = print,
    poll: float = 1.0,
) -> None:
    """Delete the resources that make nodes attach things and wait until every node detached them.

    BpfNodeStates (now empty) and NetworkIdentities stay, like the CRDs helm keeps: the operator
    owns them while it runs and would recreate them, and they hold nothing that runs in a kernel.
    BpfPolicySlices need no wait: the operator deletes them once no node state lists them, and
    any left go with their Node (ownerReference); a daemon reads them only through its node state.
    """
    custom = client.CustomObjectsApi(api)

    def items(plural: str) -> list[Object]:
        return cast(Object, custom.list_cluster_custom_object(GROUP, VERSION, plural))["items"]

    for body in items(BPF_PROGRAM_PLURAL):
        _delete(
            partial(custom.delete_cluster_custom_object, GROUP, VERSION, BPF_PROGRAM_PLURAL, body["metadata"]["name"])
        )
    for plural in (NETWORK_IDENTITY_POLICY_PLURAL, RUNTIME_SECURITY_POLICY_PLURAL):
        for body in items(plural):
            meta = body["metadata"]
            _delete(
                partial(custom.delete_namespaced_custom_object, GROUP, VERSION, meta["namespace"], plural, meta["name"])
            )
    progress("deleted every BpfProgram and policy; waiting for the nodes to detach")
    deadline = time.monotonic() + timeout
    shown: list[str] = []
    while True:
        waiting = pending(
            items(BPF_PROGRAM_PLURAL), items(NETWORK_IDENTITY_POLICY_PLURAL), items(BPF_NODE_STATE_PLURAL)
        )
        if not waiting:
            break
        if waiting != shown:
            progress("waiting: " + "; ".join(waiting[:10]) + (" ..." if len(waiting) > 10 else ""))
            shown = waiting
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout:.0f}s beekeeper is still attached: {'; '.join(waiting)}. Bring those nodes' "
                "daemons back (or remove the Node objects of nodes that are gone) and uninstall again; "
                "`helm uninstall --no-hooks` skips this check and leaves their programs running"
            )
        time.sleep(poll)
    progress("every node has detached beekeeper's programs and policies")


def _delete(call: Callable[[], object]) -> None:
    try:
        call()
    except ApiException as exc:
        if exc.status != 404:  # gone meanwhile
            raise
