"""The node daemon's view of the kernel: what it asks for, what it gets back.

The reconciler speaks only this module's vocabulary. KernelBackend implements it against the
running kernel; FakeBackend implements it in memory so the control plane can be exercised
with hundreds of simulated nodes. Nothing here knows about Kubernetes; only the hook type
names come from the API. The daemon maps a BpfNodeState spec onto ProgramUnits and the
reports back onto status.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from beekeeper.crds.program_types import ProgramType  # the API's hook names are the backend's too
from beekeeper.node_daemon.map_codec import Field, Layout

__all__ = [
    "ATTACH_TYPES",
    "MESSAGE_LIMIT",
    "AttachSpec",
    "Backend",
    "Field",
    "HookSupport",
    "Layout",
    "MapEntry",
    "MapNotFound",
    "NodeCapabilities",
    "Phase",
    "ProgramReport",
    "ProgramStats",
    "ProgramType",
    "ProgramUnit",
    "Reason",
    "UnitNotFound",
]

MESSAGE_LIMIT = 2048
"""Upper bound (bytes, UTF-8) of ProgramReport.message, so node status stays small."""


class Phase(StrEnum):
    PENDING = "Pending"
    COMPILING = "Compiling"
    LOADED = "Loaded"  # verified and pinned, attached nowhere (e.g. a pattern matching no interface yet)
    ATTACHED = "Attached"
    FAILED = "Failed"


class Reason(StrEnum):
    COMPILE_ERROR = "CompileError"  # also a compiler crash, abort or out-of-memory, with its words
    COMPILE_TIMEOUT = "CompileTimeout"
    QUARANTINED = "Quarantined"  # its build brought the node daemon down twice; retried once the spec changes
    VERIFIER_REJECTED = "VerifierRejected"
    RELOCATION_FAILED = "RelocationFailed"  # a CO-RE read of a field or type this kernel's BTF lacks
    INVALID_BYTECODE = "InvalidBytecode"  # not a BPF ELF object libbpf can open
    LOAD_FAILED = "LoadFailed"
    FUNCTION_NOT_FOUND = "FunctionNotFound"
    INVALID_SPEC = "InvalidSpec"
    UNSUPPORTED_ON_NODE = "UnsupportedOnNode"
    INTERFACE_NOT_FOUND = "InterfaceNotFound"
    NO_MATCHING_INTERFACES = "NoMatchingInterfaces"
    TRACEPOINT_NOT_FOUND = "TracepointNotFound"
    BINARY_NOT_FOUND = "BinaryNotFound"
    SYMBOL_NOT_FOUND = "SymbolNotFound"
    PROCESS_NOT_FOUND = "ProcessNotFound"
    CGROUP_NOT_FOUND = "CgroupNotFound"
    ATTACH_FAILED = "AttachFailed"


ATTACH_TYPES: dict[str, tuple[str, ...]] = {
    "cgroup_skb": ("ingress", "egress"),
    "cgroup_sock_addr": (
        "bind4",
        "bind6",
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
        "getsockname4",
        "getsockname6",
    ),
}
"""Valid AttachSpec.attach_type (cgroup_sock_addr) / direction (cgroup_skb) values."""

_TRACEPOINT = re.compile(r"^\w+[:/]\w+$")
_RAW_TRACEPOINT = re.compile(r"^\w+$")
_NEEDS_INTERFACES = (ProgramType.XDP, ProgramType.TC)
_NEEDS_CGROUP = (ProgramType.CGROUP_SKB, ProgramType.CGROUP_SOCK_ADDR)
_PROBES = (ProgramType.UPROBE, ProgramType.URETPROBE)
_BTF_ATTACHED = (ProgramType.FENTRY, ProgramType.FEXIT, ProgramType.LSM)


@dataclass(frozen=True)
class AttachSpec:
    """One program of a unit: a C function, its hook type, and where to attach it.

    Only the fields of the given type matter; the rest keep their defaults.
    """

    name: str
    """The C function in the unit's source."""
    type: ProgramType
    interfaces: tuple[str, ...] = ()
    """xdp/tc: interface names that must exist (missing ones are InterfaceNotFound)."""
    interface_pattern: str | None = None
    """xdp/tc: shell glob over the node's interfaces (e.g. "veth*"), re-evaluated on every apply."""
    direction: str = "ingress"
    """tc and cgroup_skb: "ingress" or "egress"."""
    xdp_mode: str = "native"
    """xdp: "native" (driver) or "generic" (skb; works on any interface, slower)."""
    priority: int = 0
    """tc, xdp: among beekeeper's programs on one interface (and tc direction), lower runs first."""
    tracepoint: str | None = None
    """tracepoint: "category:name" (e.g. "syscalls:sys_enter_openat"); raw_tracepoint: "name"."""
    binary: str | None = None
    """uprobe/uretprobe: path of the executable or library (or a library name like "c")."""
    symbol: str | None = None
    """uprobe/uretprobe: function in binary; kprobe/kretprobe: kernel function."""
    offset: int = 0
    pid: int | None = None
    """uprobe/uretprobe: only this process (default: every process using the binary)."""
    cgroup_path: str | None = None
    """cgroup_*: cgroup v2 directory, absolute or relative to the cgroup2 mount."""
    attach_type: str | None = None
    """cgroup_sock_addr: which socket call to hook, e.g. "connect4"."""
    btf_target: str | None = None
    """fentry/fexit: the kernel function; lsm: the hook name (e.g. "file_open")."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ProgramType(self.type))
        object.__setattr__(self, "interfaces", tuple(self.interfaces))

    def problem(self) -> str | None:
        """Why this spec cannot be acted on, or None. The CRD schema should catch these first."""
        t = self.type
        if t in _NEEDS_INTERFACES and not (self.interfaces or self.interface_pattern):
            return f"{t} program {self.name!r} needs interfaces or an interface pattern"
        if t == ProgramType.XDP and self.xdp_mode not in ("native", "generic"):
            return f"xdp mode must be native or generic, not {self.xdp_mode!r}"
        if t in (ProgramType.TC, ProgramType.CGROUP_SKB) and self.direction not in ("ingress", "egress"):
            return f"direction must be ingress or egress, not {self.direction!r}"
        if t in (ProgramType.TRACEPOINT, ProgramType.RAW_TRACEPOINT) and not self.tracepoint:
            return f"{t} program {self.name!r} needs a tracepoint"
        if t == ProgramType.TRACEPOINT and not _TRACEPOINT.match(self.tracepoint or ""):
            return f"tracepoint must be category:name, not {self.tracepoint!r}"
        if t == ProgramType.RAW_TRACEPOINT and not _RAW_TRACEPOINT.match(self.tracepoint or ""):
            return f"raw tracepoint must be a bare tracepoint name, not {self.tracepoint!r}"
        if t in _PROBES and not (self.binary and (self.symbol or self.offset)):
            return f"{t} program {self.name!r} needs a binary and a symbol or offset"
        if t in (ProgramType.KPROBE, ProgramType.KRETPROBE) and not self.symbol:
            return f"{t} program {self.name!r} needs a kernel function in symbol"
        if t in _NEEDS_CGROUP and not self.cgroup_path:
            return f"{t} program {self.name!r} needs a cgroup path"
        if t in _BTF_ATTACHED and not self.btf_target:
            return f"{t} program {self.name!r} needs a kernel {'hook' if t == ProgramType.LSM else 'function'}"
        if t == ProgramType.CGROUP_SOCK_ADDR and self.attach_type not in ATTACH_TYPES[t]:
            return f"cgroup_sock_addr attach type must be one of {', '.join(ATTACH_TYPES[t])}, not {self.attach_type!r}"
        return None

    @property
    def load_key(self) -> str:
        """Identity of the kernel program this spec needs: the same function loaded as a
        different program type or expected attach type is a different program."""
        if self.type == ProgramType.CGROUP_SKB:
            return f"{self.name}:{self.type}:{self.direction}"
        if self.type == ProgramType.CGROUP_SOCK_ADDR:
            return f"{self.name}:{self.type}:{self.attach_type}"
        if self.type in _BTF_ATTACHED:  # the target is part of the loaded program (its attach BTF id)
            return f"{self.name}:{self.type}:{self.btf_target}"
        return f"{self.name}:{self.type}"


@dataclass(frozen=True)
class ProgramUnit:
    """One compilation unit (one BpfProgram): its code, and the programs in it.

    The code is C source (compiled by bcc with cflags) or a prebuilt CO-RE ELF object
    (bytecode, loaded by libbpf with global_data patched into its global variables): exactly
    one. Programs of a unit share the unit's maps. Changing the code, the flags or the set of
    kernel programs (function x type) is a new build, swapped in without a gap; changing
    only where programs attach is converged in place without recompiling.
    """

    key: str
    source: str | None = None
    cflags: tuple[str, ...] = ()
    programs: tuple[AttachSpec, ...] = ()
    bytecode: bytes | None = None
    global_data: tuple[tuple[str, bytes], ...] = ()
    """(variable, value) pairs, sorted by name."""

    def __post_init__(self) -> None:
        if (self.source is None) == (self.bytecode is None):
            raise ValueError("a unit has exactly one of source or bytecode")
        object.__setattr__(self, "cflags", tuple(self.cflags))
        object.__setattr__(self, "programs", tuple(self.programs))
        object.__setattr__(self, "global_data", tuple(sorted(dict(self.global_data).items())))

    @cached_property
    def content_hash(self) -> str:
        """Hash of everything that determines the loaded bytecode (not the attach targets)."""
        loads = sorted({s.load_key for s in self.programs})
        doc: dict[str, object] = {"cflags": list(self.cflags), "loads": loads}
        if self.source is not None:
            doc["source"] = self.source
        if self.bytecode is not None:
            doc["bytecode"] = hashlib.sha256(self.bytecode).hexdigest()
            doc["globalData"] = {name: value.hex() for name, value in self.global_data}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ProgramReport:
    """Outcome for one AttachSpec, in the unit's order."""

    name: str
    type: str
    phase: Phase
    program_ids: tuple[int, ...] = ()
    attach_points: tuple[str, ...] = ()
    """e.g. "xdp/generic:veth0", "tcx/ingress:eth0", "tracepoint:syscalls:sys_enter_openat"."""
    reason: str = ""
    """CamelCase Reason when phase is Failed (or an informative one when Loaded)."""
    message: str = ""
    """Human detail, at most MESSAGE_LIMIT bytes: compile error with line, verifier log tail."""


@dataclass(frozen=True)
class HookSupport:
    supported: bool
    reason: str = ""


@dataclass(frozen=True)
class NodeCapabilities:
    kernel_release: str
    btf: bool
    hooks: Mapping[str, HookSupport] = field(default_factory=dict)
    """Per ProgramType value: can this node attach that type, and if not, why."""
    xdp_multi_program: HookSupport = HookSupport(False, "not probed")
    """Can one interface run several XDP programs (libxdp's dispatcher), and if not, why."""

    def support(self, program_type: str) -> HookSupport:
        return self.hooks.get(program_type, HookSupport(False, f"unknown program type {program_type!r}"))


@dataclass(frozen=True)
class MapEntry:
    key: object
    """Decoded with the caller's Layout: int, str (IPv4/IPv6/string/hex) or dict (struct)."""
    values: tuple[int, ...]
    """The value as integers (u64 words, or u32 words when the size is not a multiple of 8),
    summed over CPUs for per-CPU maps."""
    raw_key: bytes
    array_slot: bool = False
    """A slot of an array map: it exists whether or not a program stored anything (metrics skip zero ones)."""


@dataclass(frozen=True)
class ProgramStats:
    name: str
    type: str
    program_id: int
    run_count: int
    run_time_ns: int


class UnitNotFound(LookupError):
    """No unit with that key is loaded on this node."""


class MapNotFound(LookupError):
    """The unit has no map of that name."""


class Backend(ABC):
    """Converges the kernel of one node to a set of ProgramUnits, and reads their state."""

    @abstractmethod
    def capabilities(self) -> NodeCapabilities:
        """What this node's kernel can attach, probed from the kernel itself."""

    @abstractmethod
    def apply(self, unit: ProgramUnit) -> list[ProgramReport]:
        """Idempotently converge one unit; returns one report per AttachSpec, in order.

        Never raises for a problem in the unit itself (compile error, missing interface,
        unsupported hook): those are reports. A failing program does not disturb the
        others, and a program whose new build fails keeps its previous build attached.
        """

    @abstractmethod
    def remove(self, key: str) -> None:
        """Detach and unpin everything of a unit; unknown keys are a no-op."""

    @abstractmethod
    def adopted(self) -> dict[str, str]:
        """Units present on the node (including those found after a restart): key -> content_hash."""

    @abstractmethod
    def read_map(self, key: str, map_name: str, key_layout: Layout | None = None) -> list[MapEntry]:
        """All entries of a unit's map; raises UnitNotFound / MapNotFound."""

    @abstractmethod
    def program_stats(self, key: str) -> list[ProgramStats]:
        """Run counters of a unit's loaded programs (zero unless run-time stats are enabled)."""

    def sync(self, units: Iterable[ProgramUnit]) -> dict[str, list[ProgramReport]]:
        """Converge the whole node: apply every desired unit, remove every other one."""
        reports = {unit.key: self.apply(unit) for unit in units}
        for key in self.adopted().keys() - reports.keys():
            self.remove(key)
        return reports
