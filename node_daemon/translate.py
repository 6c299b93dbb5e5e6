"""Between the API (BpfNodeState models) and the kernel backend's vocabulary: pure functions."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from beekeeper.crds.bpfprogram import KeyKind, Metric, Program
from beekeeper.crds.nodestate import NodeProgram
from beekeeper.node_daemon.backend import (
    MESSAGE_LIMIT,
    AttachSpec,
    Field,
    Layout,
    NodeCapabilities,
    Phase,
    ProgramReport,
    ProgramUnit,
)
from beekeeper.node_daemon.compile_errors import bound_head

# Metric key kinds of the API onto map_codec layouts. `int` keys are unsigned: map keys
# in bcc programs are u32/u64 ids, and a negative label value would only confuse.
_KEY_KINDS = {KeyKind.INT: "uint", KeyKind.IPV4: "ipv4", KeyKind.STRING: "string"}


def attach_spec(program: Program) -> AttachSpec:
    """One API program entry as the backend's AttachSpec."""
    selector = program.interface_selector
    return AttachSpec(
        name=program.name,
        type=program.type,
        interfaces=tuple(selector.interfaces or ()) if selector else (),
        interface_pattern=selector.pattern if selector else None,
        direction=program.direction.value if program.direction else "ingress",
        xdp_mode=program.effective_xdp_mode.value,
        priority=program.effective_priority,
        tracepoint=program.tracepoint,
        binary=program.binary,
        symbol=program.symbol,
        offset=program.offset or 0,
        pid=program.pid,
        cgroup_path=program.cgroup_path,
        attach_type=program.attach_type.value if program.attach_type else None,
        btf_target=program.function or program.hook,
    )


def program_unit(entry: NodeProgram, pulled: bytes | None = None) -> ProgramUnit:
    """A BpfNodeState.spec.programs[] entry as one compilation unit, keyed by BpfProgram name.

    pulled is the object of an image entry, which the daemon pulls (the entry names only the image).
    """
    bytecode = None
    if entry.bytecode is not None:
        bytecode = pulled if entry.bytecode.object is None else base64.b64decode(entry.bytecode.object)
        if bytecode is None:
            raise ValueError(f"{entry.bpf_program}: the image {entry.bytecode.image} has not been pulled")
    return ProgramUnit(
        key=entry.bpf_program,
        source=entry.source,
        cflags=tuple(entry.cflags or ()),
        programs=tuple(attach_spec(p) for p in entry.programs),
        bytecode=bytecode,
        global_data=tuple((k, base64.b64decode(v)) for k, v in (entry.global_data or {}).items()),
    )


def key_layout(metric: Metric) -> Layout:
    """How the exporter decodes the map key of one metric."""
    key = metric.key
    if key.kind == KeyKind.STRUCT:
        fields = tuple(Field(f.name, f.type.value, f.size) for f in key.fields or ())
        return Layout("struct", fields)
    return Layout(_KEY_KINDS[key.kind])


def label_names(metric: Metric) -> list[str]:
    """Prometheus label names of one metric, in key order."""
    if metric.key.kind == KeyKind.STRUCT:
        return [f.label for f in metric.key.fields or ()]
    assert metric.key.label is not None  # the API requires it for scalar keys
    return [metric.key.label]


def label_values(metric: Metric, decoded: object) -> list[str]:
    """A decoded key as label values, in label_names order."""
    if metric.key.kind == KeyKind.STRUCT:
        assert isinstance(decoded, dict)
        return [str(decoded[f.name]) for f in metric.key.fields or ()]
    return [str(decoded)]


def transition_time(before: Mapping[str, Any], phase: str, now: str) -> str:
    """An entry's lastTransitionTime: kept from its previous report while the phase stays, else now."""
    return before.get("lastTransitionTime", now) if before.get("phase") == phase else now


def program_statuses(
    entry: NodeProgram,
    reports: Sequence[ProgramReport],
    previous: Mapping[tuple[str, str], Mapping[str, Any]],
    now: str,
) -> list[dict[str, Any]]:
    """status.programs[] entries for one unit; lastTransitionTime moves only when the phase does."""
    out = []
    for report in reports:
        before = previous.get((entry.bpf_program, report.name)) or {}
        phase = report.phase.value
        item: dict[str, Any] = {
            "bpfProgram": entry.bpf_program,
            "name": report.name,
            "contentHash": entry.content_hash,
            "phase": phase,
            "lastTransitionTime": transition_time(before, phase, now),
        }
        if report.program_ids:
            item["programIds"] = list(report.program_ids)
        if report.attach_points:
            item["attachPoints"] = list(report.attach_points)
        if report.reason:
            item["reason"] = report.reason
        if report.message:
            item["message"] = report.message
        out.append(item)
    return out


def pending_statuses(
    entry: NodeProgram, phase: Phase, previous: Mapping[tuple[str, str], Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Entries for a unit that is being built right now (phase Compiling), before the backend answers."""
    reports = [ProgramReport(name=p.name, type=p.type.value, phase=phase) for p in entry.programs]
    return program_statuses(entry, reports, previous, now)


def capabilities(caps: NodeCapabilities) -> dict[str, Any]:
    """BpfNodeState.status.capabilities from the backend's probe."""
    out = {
        "kernelVersion": caps.kernel_release,
        "btf": caps.btf,
        "programTypes": {name: hook.supported for name, hook in sorted(caps.hooks.items())},
        "reasons": {
            name: hook.reason for name, hook in sorted(caps.hooks.items()) if not hook.supported and hook.reason
        },
        "xdpMultiProgram": caps.xdp_multi_program.supported,
    }
    if caps.xdp_multi_program.reason:
        out["xdpMultiProgramReason"] = bound_head(caps.xdp_multi_program.reason, MESSAGE_LIMIT)
    return out
