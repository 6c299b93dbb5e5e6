"""From (BpfPrograms, Nodes, ConfigMaps) to what each node must run: pure functions.

The operator's handlers only gather inputs and write outputs; everything that decides
lives here so it is unit-tested without a cluster.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from beekeeper.crds.bpfprogram import BpfProgram, BpfProgramSpec
from beekeeper.crds.nodestate import MAX_BYTECODE, NodeBytecode, NodeProgram, content_hash
from beekeeper.operator.image_resolver import Resolution
from beekeeper.operator.selectors import matches

Body = Mapping[str, Any]
ConfigMapLookup = Callable[[str, str], Mapping[str, str] | None]
"""(namespace, name) -> the ConfigMap's data (or binaryData, base64), None when it does not exist."""


def no_binary_configmaps(_namespace: str, _name: str) -> None:
    return None


ImageLookup = Callable[[str, Mapping[str, Any] | None], Resolution]
"""(spec.bytecode.image, the BpfProgram's status.image) -> digest and signature verdict (the registry boundary)."""


def no_images(reference: str, _previous: Mapping[str, Any] | None) -> Resolution:
    return Resolution(reference, error="spec.bytecode.image: this operator resolves no images", reason="SourceError")


class SourceError(ValueError):
    """The program's code cannot be resolved (e.g. its ConfigMap or key is missing)."""

    def __init__(self, message: str, reason: str = "SourceError", hold: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.hold = hold


@dataclass
class Placement:
    """The outcome for one BpfProgram: its resolved node entry and the nodes selected for it."""

    name: str
    generation: int | None
    deleting: bool = False
    nodes: list[str] = field(default_factory=list)
    entry: NodeProgram | None = None
    error: str | None = None
    error_reason: str = "SourceError"
    hold: bool = False
    """The error may pass (registry unreachable): nodes keep running the entry they have."""
    image: Resolution | None = None


def resolve_source(spec: BpfProgramSpec, configmap: ConfigMapLookup) -> str:
    """The C text of a BpfProgram: inline, or read from the referenced ConfigMap key."""
    assert spec.source is not None
    if spec.source.inline is not None:
        return spec.source.inline
    ref = spec.source.config_map_ref
    assert ref is not None  # the model guarantees exactly one source
    data = configmap(ref.namespace, ref.name)
    where = f"spec.source.configMapRef: ConfigMap {ref.namespace}/{ref.name}"
    if data is None:
        raise SourceError(f"{where} not found")
    if ref.key not in data:
        raise SourceError(f"{where} has no key {ref.key!r} (keys: {', '.join(sorted(data)) or 'none'})")
    if not data[ref.key].strip():
        raise SourceError(f"{where} key {ref.key!r} is empty")
    return data[ref.key]


def image_bytecode(resolution: Resolution) -> NodeBytecode:
    """The node entry's bytecode for a resolved image: the pinned reference, never a tag."""
    if resolution.error is not None or resolution.pinned is None or resolution.digest is None:
        error = resolution.error or "spec.bytecode.image: not resolved"
        raise SourceError(error, resolution.reason or "ImageResolutionFailed", hold=resolution.retry_in is not None)
    return NodeBytecode(image=resolution.pinned, sha256=resolution.digest.removeprefix("sha256:"))


def resolve_bytecode(spec: BpfProgramSpec, binary: ConfigMapLookup) -> NodeBytecode:
    """The object of a BpfProgram from its ConfigMap binaryData key, with its sha256."""
    assert spec.bytecode is not None
    ref = spec.bytecode.config_map_ref
    assert ref is not None  # images go through image_bytecode
    data = binary(ref.namespace, ref.name)
    where = f"spec.bytecode.configMapRef: ConfigMap {ref.namespace}/{ref.name}"
    if data is None:
        raise SourceError(f"{where} not found")
    if ref.key not in data:
        keys = ", ".join(sorted(data)) or "none"
        raise SourceError(f"{where} has no binaryData key {ref.key!r} (binaryData keys: {keys})")
    try:
        raw = base64.b64decode(data[ref.key], validate=True)
    except binascii.Error:
        raise SourceError(f"{where} binaryData key {ref.key!r} is not base64") from None
    if not raw:
        raise SourceError(f"{where} binaryData key {ref.key!r} is empty")
    if len(raw) > MAX_BYTECODE:
        raise SourceError(
            f"{where} key {ref.key!r} holds {len(raw)} bytes, more than the {MAX_BYTECODE // 1024} KiB a "
            "BpfNodeState can carry per program: strip DWARF (llvm-strip -g keeps the BTF CO-RE needs) or "
            "ship it as an image (spec.bytecode.image)"
        )
    return NodeBytecode(object=base64.b64encode(raw).decode(), sha256=hashlib.sha256(raw).hexdigest())


def node_entry(program: BpfProgram, source: str | None, bytecode: NodeBytecode | None = None) -> NodeProgram:
    """The BpfNodeState.spec.programs[] entry for one BpfProgram."""
    spec = program.spec
    sha = bytecode.sha256 if bytecode else None
    return NodeProgram(
        bpf_program=program.metadata.name,
        uid=program.metadata.uid or "",
        generation=program.metadata.generation or 1,
        content_hash=content_hash(source, spec.cflags, spec.programs, sha, spec.global_data),
        source=source,
        bytecode=bytecode,
        global_data=spec.global_data,
        cflags=spec.cflags,
        programs=spec.programs,
        metrics=spec.metrics,
    )


def place(
    bpfprograms: Iterable[Body],
    node_labels: Mapping[str, Mapping[str, str]],
    configmap: ConfigMapLookup,
    binary: ConfigMapLookup = no_binary_configmaps,
    image: ImageLookup = no_images,
) -> list[Placement]:
    """Resolve every BpfProgram and the nodes its nodeSelector picks.

    Programs being deleted are placed nowhere, so every node detaches them and the
    finalizer can complete. Oldest first (creationTimestamp, then name): node entries keep this
    order, and a node daemon gives a metric family two BpfPrograms claim to the first one.
    """
    placements = []
    for body in sorted(
        bpfprograms, key=lambda b: (b["metadata"].get("creationTimestamp") or "", b["metadata"]["name"])
    ):
        meta = body["metadata"]
        placement = Placement(meta["name"], meta.get("generation"), deleting=bool(meta.get("deletionTimestamp")))
        placements.append(placement)
        if placement.deleting:
            continue
        try:
            program = BpfProgram.from_dict({k: v for k, v in body.items() if k != "status"})
        except ValidationError as exc:
            placement.error = f"spec is not valid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
            continue
        selector = program.spec.node_selector.to_dict() if program.spec.node_selector else None
        placement.nodes = sorted(n for n, labels in node_labels.items() if matches(selector, labels))
        try:
            if program.spec.source is not None:
                placement.entry = node_entry(program, resolve_source(program.spec, configmap))
            elif program.spec.bytecode is not None and program.spec.bytecode.image is not None:
                placement.image = image(program.spec.bytecode.image, (body.get("status") or {}).get("image"))
                placement.entry = node_entry(program, None, image_bytecode(placement.image))
            else:
                placement.entry = node_entry(program, None, resolve_bytecode(program.spec, binary))
        except SourceError as exc:
            placement.error, placement.error_reason, placement.hold = str(exc), exc.reason, exc.hold
    return placements


def node_programs(
    placements: Iterable[Placement],
    nodes: Iterable[str],
    current: Callable[[str, str], Mapping[str, Any] | None] = lambda _node, _name: None,
) -> dict[str, list[dict[str, Any]]]:
    """Per node, the wire form of the entries it must run, in a stable order (stable bytes, no rewrites).

    A held placement (its image could not be resolved or judged right now) keeps what
    `current(node, name)` says the node already runs, so a registry outage detaches nothing.
    """
    per_node: dict[str, list[dict[str, Any]]] = {node: [] for node in nodes}
    for placement in placements:
        if placement.entry is None and not placement.hold:
            continue
        wire = placement.entry.to_dict() if placement.entry is not None else None
        for node in placement.nodes:
            if node not in per_node:
                continue
            kept = wire if wire is not None else current(node, placement.name)
            if kept is not None:
                per_node[node].append(dict(kept))
    return per_node
