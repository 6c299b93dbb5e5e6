"""An in-memory Backend, for exercising the control plane with many simulated nodes.

It keeps the real backend's contract (report per spec in order, idempotent apply, a new
build only when the content hash changes, program ids stable across re-applies and
restarts, maps reset by a new build) without touching the kernel. Failures can be
provoked from the outside: a `#error` line in the source is a CompileError at that line,
a function the source does not define is FunctionNotFound, an interface the fake node
does not have is InterfaceNotFound, a hook marked unsupported in the capabilities is
UnsupportedOnNode, and so is the XDP program of a second unit on one interface unless the
capabilities say the node runs several. State lives in a FakeKernel, so a second FakeBackend on the same
FakeKernel behaves like a restarted daemon adopting its pins.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from beekeeper.node_daemon.backend import (
    AttachSpec,
    Backend,
    HookSupport,
    Layout,
    MapEntry,
    MapNotFound,
    NodeCapabilities,
    Phase,
    ProgramReport,
    ProgramStats,
    ProgramType,
    ProgramUnit,
    Reason,
    UnitNotFound,
)
from beekeeper.node_daemon.map_codec import default_layout

_ERROR_DIRECTIVE = re.compile(r"^\s*#\s*error\b\s*(.*)$")
_MAP_DECL = re.compile(r"\bBPF_(?!TABLE)[A-Z_]+\s*\(\s*(\w+)\s*[,)]")
_TABLE_DECL = re.compile(r"\bBPF_TABLE(?:_PINNED)?\s*\(\s*\"\w+\"\s*,[^,]+,[^,]+,\s*(\w+)")
_KPROBES_MISSING = HookSupport(False, "kernel built without kprobes (fake node)")
_NO_MULTI_PROGRAM_XDP = HookSupport(False, "the kernel refuses freplace extension programs (fake node)")


def default_capabilities() -> NodeCapabilities:
    """Everything supported except kprobes and several XDP programs per interface, like the
    development machines."""
    hooks = {t.value: HookSupport(True) for t in ProgramType}
    hooks[ProgramType.KPROBE] = hooks[ProgramType.KRETPROBE] = _KPROBES_MISSING
    return NodeCapabilities(
        kernel_release="6.18.0-fake", btf=True, hooks=hooks, xdp_multi_program=_NO_MULTI_PROGRAM_XDP
    )


@dataclass
class _Unit:
    content_hash: str
    program_ids: dict[str, int]
    maps: dict[str, dict[bytes, tuple[int, ...]]]


@dataclass
class FakeKernel:
    """What survives a (fake) daemon restart: the units and the id counter."""

    units: dict[str, _Unit] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1000))
    builds: int = 0
    """How many (fake) compiles happened; lets tests assert that nothing was reloaded."""
    xdp_holders: dict[str, str] = field(default_factory=dict)
    """Interface -> the unit whose XDP program it runs."""
    lock: threading.RLock = field(default_factory=threading.RLock)


class FakeBackend(Backend):
    def __init__(
        self,
        kernel: FakeKernel | None = None,
        *,
        interfaces: Iterable[str] = ("lo", "eth0"),
        capabilities: NodeCapabilities | None = None,
    ) -> None:
        self.kernel = kernel or FakeKernel()
        self.interfaces = set(interfaces)
        self._caps = capabilities or default_capabilities()

    def capabilities(self) -> NodeCapabilities:
        return self._caps

    def adopted(self) -> dict[str, str]:
        with self.kernel.lock:
            return {key: unit.content_hash for key, unit in self.kernel.units.items()}

    def apply(self, unit: ProgramUnit) -> list[ProgramReport]:
        with self.kernel.lock:
            source = unit.source or ""  # a CO-RE object has no source: it loads, with no maps the fake knows
            compile_error = _compile_error(source)
            state = self.kernel.units.get(unit.key)
            if compile_error is None and (state is None or state.content_hash != unit.content_hash):
                self.kernel.builds += 1
                names = _MAP_DECL.findall(source) + _TABLE_DECL.findall(source)
                maps: dict[str, dict[bytes, tuple[int, ...]]] = {name: {} for name in names}
                state = self.kernel.units[unit.key] = _Unit(unit.content_hash, {}, maps)
            self._release_xdp(unit.key)
            return [self._report(unit, spec, state, compile_error) for spec in unit.programs]

    def remove(self, key: str) -> None:
        with self.kernel.lock:
            self.kernel.units.pop(key, None)
            self._release_xdp(key)

    def _release_xdp(self, key: str) -> None:
        self.kernel.xdp_holders = {n: holder for n, holder in self.kernel.xdp_holders.items() if holder != key}

    def read_map(self, key: str, map_name: str, key_layout: Layout | None = None) -> list[MapEntry]:
        with self.kernel.lock:
            entries = self._map(key, map_name)
            return [MapEntry((key_layout or default_layout(len(k))).decode(k), v, k) for k, v in entries.items()]

    def program_stats(self, key: str) -> list[ProgramStats]:
        with self.kernel.lock:
            unit = self._unit(key)
            return [
                ProgramStats(load_key.split(":")[0], load_key.split(":")[1], pid, 0, 0)
                for load_key, pid in unit.program_ids.items()
            ]

    def set_map(self, key: str, map_name: str, entries: Mapping[bytes, Sequence[int]]) -> None:
        """Test hook: what the (fake) programs would have counted."""
        with self.kernel.lock:
            table = self._map(key, map_name)
            table.clear()
            table.update({k: tuple(v) for k, v in entries.items()})

    def _unit(self, key: str) -> _Unit:
        unit = self.kernel.units.get(key)
        if unit is None:
            raise UnitNotFound(f"no unit {key!r} on this node")
        return unit

    def _map(self, key: str, map_name: str) -> dict[bytes, tuple[int, ...]]:
        maps = self._unit(key).maps
        if map_name not in maps:
            raise MapNotFound(f"unit {key} has no map {map_name!r} (it has: {', '.join(sorted(maps)) or 'none'})")
        return maps[map_name]

    def _report(
        self, unit: ProgramUnit, spec: AttachSpec, state: _Unit | None, compile_error: str | None
    ) -> ProgramReport:
        def failed(reason: Reason, message: str, ids: tuple[int, ...] = ()) -> ProgramReport:
            return ProgramReport(spec.name, spec.type, Phase.FAILED, ids, (), reason, message)

        problem = spec.problem()
        if problem:
            return failed(Reason.INVALID_SPEC, problem)
        support = self._caps.support(spec.type)
        if not support.supported:
            return failed(Reason.UNSUPPORTED_ON_NODE, f"{spec.type} is unsupported on this node: {support.reason}")
        if compile_error is not None:
            return failed(Reason.COMPILE_ERROR, compile_error)
        if unit.bytecode is not None:
            if spec.name.encode() not in unit.bytecode:  # the symbol table names every function
                return failed(Reason.FUNCTION_NOT_FOUND, f"no program {spec.name!r} in the object")
        elif not re.search(rf"\b{re.escape(spec.name)}\s*\(", unit.source or ""):
            return failed(Reason.FUNCTION_NOT_FOUND, f"no function {spec.name!r} in the source")
        assert state is not None
        ids = (state.program_ids.setdefault(spec.load_key, next(self.kernel.ids)),)
        if spec.type not in (ProgramType.XDP, ProgramType.TC):
            return ProgramReport(spec.name, spec.type, Phase.ATTACHED, ids, (_point(spec),))
        missing = [name for name in spec.interfaces if name not in self.interfaces]
        if missing:
            return failed(
                Reason.INTERFACE_NOT_FOUND, f"interface {', '.join(missing)} does not exist on this node", ids
            )
        names = list(spec.interfaces)
        if spec.interface_pattern:
            names += sorted(
                n for n in self.interfaces if fnmatch.fnmatchcase(n, spec.interface_pattern) and n not in names
            )
        if not names:
            message = f"no interface on this node matches {spec.interface_pattern!r}"
            return ProgramReport(spec.name, spec.type, Phase.LOADED, ids, (), Reason.NO_MATCHING_INTERFACES, message)
        if spec.type == ProgramType.XDP and not self._caps.xdp_multi_program.supported:
            held = {n: h for n in names if (h := self.kernel.xdp_holders.setdefault(n, unit.key)) != unit.key}
            if held:
                message = "; ".join(
                    f"{_point(spec, n)}: BpfProgram {h} already runs an XDP program there; a second XDP program "
                    f"on one interface needs libxdp's multi-program dispatcher, which this node cannot run: "
                    f"{self._caps.xdp_multi_program.reason}"
                    for n, h in held.items()
                )
                return failed(Reason.UNSUPPORTED_ON_NODE, message, ids)
        return ProgramReport(spec.name, spec.type, Phase.ATTACHED, ids, tuple(_point(spec, n) for n in names))


def _compile_error(source: str) -> str | None:
    for number, line in enumerate(source.splitlines(), start=1):
        m = _ERROR_DIRECTIVE.match(line)
        if m:
            return f"1 compile error(s); first at main.c:{number}\nmain.c:{number}:2: error: {m[1]}"
    return None


def _point(spec: AttachSpec, interface: str = "") -> str:
    """Attach point strings in the real backend's format."""
    t = spec.type
    if t == ProgramType.XDP:
        return f"xdp/{spec.xdp_mode}:{interface}"
    if t == ProgramType.TC:
        return f"tcx/{spec.direction}:{interface}"
    if t == ProgramType.TRACEPOINT:
        return f"tracepoint:{str(spec.tracepoint).replace('/', ':')}"
    if t == ProgramType.RAW_TRACEPOINT:
        return f"raw_tracepoint:{spec.tracepoint}"
    if t in (ProgramType.UPROBE, ProgramType.URETPROBE):
        return f"{t}:{spec.binary}:{spec.symbol}"
    if t in (ProgramType.KPROBE, ProgramType.KRETPROBE):
        return f"{t}:{spec.symbol}"
    hook = spec.direction if t == ProgramType.CGROUP_SKB else spec.attach_type
    return f"{t}/{hook}:{spec.cgroup_path}"
