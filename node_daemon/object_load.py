"""Loading a unit's prebuilt CO-RE object with libbpf, one failing program at a time.

libbpf loads an object all or nothing and stops at the first program the kernel refuses,
whereas a unit promises that one failing program does not keep its siblings from running.
So a refusal is recorded against that program and the object is opened again without it,
until every remaining program loads. One object load holds each function once; a function
the unit loads as two program types (a cgroup_skb program for ingress and egress) is loaded
again in a second round that reuses the first round's maps, so the unit keeps one set.

This runs inside a compile worker (compile_worker), so a malformed object that crashes
libbpf takes down only that process.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from beekeeper.node_daemon.backend import MESSAGE_LIMIT, Reason
from beekeeper.node_daemon.bpf_syscalls import BpfError, OwnedFd
from beekeeper.node_daemon.compile_errors import CompileFailed, LoadFailed, bound_head, bound_tail
from beekeeper.node_daemon.libbpf import (
    BpfObject,
    GlobalDataError,
    ObjectLoadFailed,
    ObjectOpenFailed,
    ProgramDesc,
    verifier_reason,
)

if TYPE_CHECKING:
    from beekeeper.node_daemon.compile_worker import Load

OBJECT_NAME = "beekeeper"
"""libbpf's name for every unit's object (it prefixes internal maps: beekeeper.rodata)."""
_TRANSIENT_ERRNOS = frozenset({errno.EPERM, errno.ENOMEM, errno.EAGAIN, errno.EBUSY, errno.EINTR})


@dataclass
class LoadedObject:
    """What an object load produced: fds this process owns."""

    map_fds: dict[str, OwnedFd] = field(default_factory=dict)
    """The object's own maps (not libbpf's .rodata/.data/.bss maps: its programs hold those)."""
    programs: dict[str, OwnedFd] = field(default_factory=dict)
    """load key -> program."""
    failures: dict[str, LoadFailed] = field(default_factory=dict)

    def maps(self) -> dict[str, int]:
        return {name: fd.fd for name, fd in self.map_fds.items()}

    def close(self) -> None:
        for fd in [*self.map_fds.values(), *self.programs.values()]:
            fd.close()


def select(programs: Sequence[ProgramDesc], name: str) -> str | None:
    """The function a spec names: by function name, else the one program in that ELF section."""
    if any(p.name == name for p in programs):
        return name
    in_section = [p.name for p in programs if p.section == name]
    return in_section[0] if len(in_section) == 1 else None


def load_object(data: bytes, global_data: Mapping[str, bytes], loads: Sequence[Load]) -> LoadedObject:
    """Load every load it can; raises CompileFailed when the object as a whole is unusable."""
    try:
        with BpfObject.open(data, name=OBJECT_NAME) as probe:
            programs = probe.programs()
            probe.set_global_data(global_data)
    except ObjectOpenFailed as exc:
        raise CompileFailed(exc.message, Reason.INVALID_BYTECODE) from None
    except GlobalDataError as exc:
        raise CompileFailed(f"globalData: {exc}", Reason.INVALID_SPEC) from None
    result = LoadedObject()
    pending: list[tuple[str, Load]] = []
    for load in loads:
        function = select(programs, load.function)
        if function is None:
            have = ", ".join(f"{p.name} (section {p.section})" for p in programs) or "none"
            result.failures[load.key] = LoadFailed(
                Reason.FUNCTION_NOT_FOUND, f"no program {load.function!r} in the object; it has: {have}"
            )
        else:
            pending.append((function, load))
    try:
        while pending:
            batch: dict[str, Load] = {}
            rest = []
            for function, load in pending:
                if function in batch:
                    rest.append((function, load))
                else:
                    batch[function] = load
            _load_batch(data, global_data, batch, result)
            pending = rest
    except BaseException:
        result.close()
        raise
    return result


def _load_batch(data: bytes, global_data: Mapping[str, bytes], batch: dict[str, Load], out: LoadedObject) -> None:
    """Load batch (one load per function) into out, dropping each program the kernel refuses."""
    while batch:
        with BpfObject.open(data, name=OBJECT_NAME) as obj:
            for name, fd in out.map_fds.items():
                obj.reuse_map(name, fd.fd)
            obj.load_only(batch)
            refused = None
            for function, load in batch.items():
                obj.set_program_type(function, load.prog_type, load.expected_attach_type or 0)
                if load.attach_target:
                    try:
                        obj.set_attach_target(function, load.attach_target)
                    except BpfError as exc:
                        refused = function
                        out.failures[load.key] = LoadFailed(
                            Reason.SYMBOL_NOT_FOUND,
                            f"{load.attach_target} is not a kernel function or hook this kernel's BTF knows "
                            f"({exc.strerror})",
                        )
                        break
            if refused is not None:
                del batch[refused]
                continue
            obj.set_global_data(global_data)
            try:
                obj.load()
            except ObjectLoadFailed as exc:
                if exc.program not in batch:
                    raise CompileFailed(bound_head(exc.message, MESSAGE_LIMIT), Reason.LOAD_FAILED) from None
                out.failures[batch.pop(exc.program).key] = load_failure(exc)
                continue
            for function, load in batch.items():
                out.programs[load.key] = obj.program_fd(function)
            if not out.map_fds:
                out.map_fds = {m.name: obj.map_fd(m.name) for m in obj.maps() if not m.internal}
            return


def load_failure(exc: ObjectLoadFailed) -> LoadFailed:
    """A refused program as the reason and message its status shows."""
    if exc.relocation_failed:
        return LoadFailed(Reason.RELOCATION_FAILED, _with_log(exc.message, exc.verifier_log))
    if exc.verifier_log and exc.errno not in _TRANSIENT_ERRNOS:
        head = f"verifier rejected {exc.program}: {verifier_reason(exc.verifier_log)}"
        where = next((line[2:] for line in reversed(exc.verifier_log.splitlines()) if line.startswith("; ")), "")
        return LoadFailed(
            Reason.VERIFIER_REJECTED, _with_log(head + (f"\n  at {where}" if where else ""), exc.verifier_log)
        )
    return LoadFailed(
        Reason.LOAD_FAILED,
        bound_head(f"loading {exc.program} failed: {os.strerror(exc.errno)}", MESSAGE_LIMIT),
        transient=exc.errno in _TRANSIENT_ERRNOS,
    )


def _with_log(head: str, log: str) -> str:
    """head, then as much of the log's tail as fits in a status message."""
    head += "\nverifier log (tail):"
    return head + "\n" + bound_tail(log, MESSAGE_LIMIT - len(head.encode()) - 1)
