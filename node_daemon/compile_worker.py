"""Building a unit's C in a child process, so no user program can crash, hang or starve the daemon.

LLVM answers some bad input by calling exit() or abort() (a function needing more than 512
bytes of stack), and some sources take minutes and gigabytes to preprocess. So every build
runs in a worker: a fresh `python -m` of this module, with lowered rlimits (address space,
CPU, no core dumps) and, unless disabled, a Landlock sandbox that lets it read only the
kernel headers and tracefs event formats (bcc's own headers are compiled into libbcc; the
program's source arrives over the socket). The worker compiles, loads every function (the
kernel verifies them), and sends the program and map fds to the daemon over a unix socket
(SCM_RIGHTS) with the messages as JSON; the daemon pins and attaches them as before. A
worker that dies, exceeds its time or runs out of memory becomes a CompileError or
CompileTimeout carrying what the compiler printed (its stderr is a file the daemon reads).

Each worker builds one unit and exits, so nothing accumulates between builds; after each
build the next worker is started ahead (importing bcc costs a few hundred milliseconds)
while the daemon pins and attaches, so only a daemon's first build waits for one. A worker
imports bcc only to compile source (it must, before the sandbox closes): the spare is
started for the kind of job that came last, and a CO-RE object load never pays for bcc. Workers
die with the daemon (PR_SET_PDEATHSIG); what a worker loaded but never handed over is
freed by the kernel when its fds close.
"""

from __future__ import annotations

import base64
import ctypes as ct
import json
import logging
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from beekeeper.node_daemon import landlock
from beekeeper.node_daemon.backend import Reason
from beekeeper.node_daemon.bpf_syscalls import OwnedFd
from beekeeper.node_daemon.compile_errors import CompileFailed, LoadFailed, compile_error_message
from beekeeper.node_daemon.compile_limits import CompileLimits
from beekeeper.node_daemon.object_load import LoadedObject, load_object

if TYPE_CHECKING:  # bcc is imported by the worker process only (_serve): it costs the daemon tens of MiB
    from beekeeper.node_daemon.bcc_compile import CompiledModule

log = logging.getLogger(__name__)

_FRAME = struct.Struct("!Q")
_FDS_PER_MESSAGE = 250  # the kernel's SCM_MAX_FD is 253
_PR_SET_PDEATHSIG = 1
_MEMORY_WORDS = re.compile(r"out of memory|bad_alloc|cannot allocate memory|allocation failed", re.IGNORECASE)


@dataclass(frozen=True)
class Load:
    """One kernel program to load from the unit: a function as a program type."""

    key: str
    function: str
    """The function; for an object also the ELF section name of exactly one program."""
    prog_type: int
    expected_attach_type: int | None = None
    attach_target: str | None = None
    """fentry/fexit: the kernel function; lsm: the hook (objects only)."""


@dataclass
class Built:
    """What a worker handed over: fds this process now owns (pin them, then close())."""

    maps: dict[str, OwnedFd] = field(default_factory=dict)
    programs: dict[str, OwnedFd] = field(default_factory=dict)
    failures: dict[str, LoadFailed] = field(default_factory=dict)
    """load key -> why that function did not load (verifier, missing function, ...)."""

    def close(self) -> None:
        for fd in [*self.maps.values(), *self.programs.values()]:
            fd.close()

    def __enter__(self) -> Built:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def sandbox_paths(tracefs: str | None) -> list[str]:
    """What the compiler may read: the running kernel's headers (wherever their symlinks
    point), the tracefs event formats (TRACEPOINT_PROBE), BTF and the CPU list."""
    release = os.uname().release
    modules = Path("/lib/modules") / release
    paths = [os.path.realpath(modules / link) for link in ("build", "source") if (modules / link).exists()]
    paths += ["/sys/kernel/btf", "/sys/devices/system/cpu", f"/tmp/kheaders-{release}"]  # kheaders: bcc's fallback
    if tracefs:
        paths.append(os.path.join(tracefs, "events"))
    return list(dict.fromkeys(paths))


class CompileWorkers:
    """Runs builds in workers, one at a time (the backend serializes applies), keeping the
    next worker started ahead. Thread-compatible, not thread-safe."""

    def __init__(self, limits: CompileLimits, read_paths: Sequence[str]) -> None:
        self.limits = limits
        self._config = {
            "parent": os.getpid(),
            "memory_mib": limits.memory_mib,
            "cpu_seconds": int(limits.timeout) + 2,
            "sandbox": limits.sandbox,
            "read": list(read_paths),
        }
        self._spare: _Worker | None = None

    def build(self, source: str, cflags: Sequence[str], loads: Iterable[Load]) -> Built:
        """Compile source and load loads; raises CompileFailed (with reason CompileError or
        CompileTimeout) when the source does not compile or the worker fails."""
        return self._run({"source": source, "cflags": list(cflags), "loads": [vars(load) for load in loads]})

    def load_object(self, data: bytes, global_data: Mapping[str, bytes], loads: Iterable[Load]) -> Built:
        """Load loads from a CO-RE ELF object with libbpf (global_data patched in first); raises
        CompileFailed when the object as a whole is unusable or the worker fails."""
        job = {
            "object": base64.b64encode(data).decode(),
            "global_data": {name: base64.b64encode(value).decode() for name, value in global_data.items()},
            "loads": [vars(load) for load in loads],
        }
        return self._run(job)

    def _run(self, job: dict[str, Any]) -> Built:
        compiles = "source" in job
        worker, self._spare = self._spare, None
        if worker is None or not worker.alive() or worker.compiles != compiles:
            if worker is not None:
                worker.close()
            worker = _Worker(self._config, compiles)
        started = time.monotonic()
        try:
            return worker.run(job, self.limits)
        finally:
            worker.close()
            log.debug("build in worker %d took %.3fs", worker.proc.pid, time.monotonic() - started)
            self._spare = _Worker(self._config, compiles)

    def close(self) -> None:
        if self._spare is not None:
            self._spare.close()
            self._spare = None


class _Worker:
    """One worker process and the daemon's end of its socket."""

    def __init__(self, config: dict[str, Any], compiles: bool) -> None:
        self.compiles = compiles  # C source with bcc (imported ahead), else CO-RE objects only
        config = {**config, "compiles": compiles}
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stderr = tempfile.TemporaryFile(prefix="beekeeper-compile-")  # noqa: SIM115 (closed in close())
        with child:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child.fileno()), json.dumps(config)],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=self.stderr,
                stderr=self.stderr,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job: dict[str, Any], limits: CompileLimits) -> Built:
        deadline = time.monotonic() + limits.timeout
        try:
            _send_frame(self.sock, json.dumps(job).encode(), deadline)
            header = json.loads(_recv_frame(self.sock, deadline))
            fds = _recv_fds(self.sock, len(header["maps"]) + len(header["programs"]), deadline)
        except TimeoutError:
            self._stop()
            raise CompileFailed(
                self._words(f"did not finish within {limits.timeout:g}s"), Reason.COMPILE_TIMEOUT
            ) from None
        except (OSError, EOFError, ValueError):
            raise CompileFailed(self._words(self._death(limits))) from None
        if header.get("compile_failure") is not None:
            for fd in fds:
                fd.close()
            failure = header["compile_failure"]
            raise CompileFailed(failure["message"], Reason(failure["reason"]))
        built = Built()
        names = [*header["maps"], *header["programs"]]
        for i, (name, fd) in enumerate(zip(names, fds, strict=True)):
            (built.maps if i < len(header["maps"]) else built.programs)[name] = fd
        for key, f in header["failures"].items():
            built.failures[key] = LoadFailed(Reason(f["reason"]), f["message"], f["transient"])
        return built

    def _death(self, limits: CompileLimits) -> str:
        """How the worker ended, once it has (it closed the socket, or is about to)."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self._stop()
            return "closed its connection without an answer"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        output = self._stderr_text()
        if _MEMORY_WORDS.search(output) or code == -signal.SIGKILL:  # bad_alloc under RLIMIT_AS, or the OOM killer
            how += f" (its memory limit is {limits.memory_mib} MiB)"
        log.warning("compile worker %d %s; its output:\n%s", self.proc.pid, how, output[-8192:].rstrip())
        return how

    def _words(self, what: str) -> str:
        """The compiler's own diagnostics first, then what happened to it."""
        text = self._stderr_text()
        head = f"the compiler {what}; the node daemon is unaffected"
        if not text.strip():
            return head
        return compile_error_message(text + f"\nerror: {head}")

    def _stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def _stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.sock.close()  # a spare waiting for a job sees EOF and exits
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self._stop()
        self.stderr.close()


# --- framing ------------------------------------------------------------------------------


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _send_frame(sock: socket.socket, payload: bytes, deadline: float | None = None) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(_FRAME.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return bytes(data)


def _recv_frame(sock: socket.socket, deadline: float | None = None) -> bytes:
    (size,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size, deadline))
    return _recv_exact(sock, size, deadline)


def _send_fds(sock: socket.socket, fds: list[int]) -> None:
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], fds[i : i + _FDS_PER_MESSAGE])


def _recv_fds(sock: socket.socket, count: int, deadline: float) -> list[OwnedFd]:
    received: list[OwnedFd] = []
    try:
        while len(received) < count:
            want = min(count - len(received), _FDS_PER_MESSAGE)
            sock.settimeout(_remaining(deadline))
            data, fds, flags, _ = socket.recv_fds(sock, 1, want, socket.MSG_CMSG_CLOEXEC)
            received += [OwnedFd(fd) for fd in fds]
            if not data or flags & socket.MSG_CTRUNC or len(fds) != want:
                raise EOFError("file descriptors missing from the worker's answer")
    except BaseException:
        for fd in received:
            fd.close()
        raise
    return received


# --- the worker process -------------------------------------------------------------------


def _confine(config: dict[str, Any]) -> str | None:
    """Lower this process's limits and sandbox it; the reason when the sandbox is impossible."""
    # A daemon stopping (SIGTERM/SIGINT to its process group) finishes the build under way;
    # a build cut short here would be recorded as failed for good. The worker ends with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ct.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != config["parent"]:
        sys.exit(0)  # the daemon died before the death signal was armed
    for limit, value in (
        (resource.RLIMIT_AS, config["memory_mib"] << 20),
        (resource.RLIMIT_CPU, int(time.process_time()) + config["cpu_seconds"]),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # only lowering is allowed
        resource.setrlimit(limit, (value, value))
    if not config["sandbox"]:
        return None
    try:
        landlock.restrict_reads(config["read"])
    except OSError as exc:
        return (
            f"the compiler cannot be sandboxed on this node ({exc}); "
            "start the node daemon with --compile-sandbox=none to compile without confining #include"
        )
    return None


def _build(job: dict[str, Any]) -> tuple[dict[str, Any], CompiledModule | None, dict[str, OwnedFd]]:
    """The answer's header, and what holds the fds it announces (maps: the module)."""
    from beekeeper.node_daemon.bcc_compile import CompiledModule  # imported already by _serve

    try:
        module = CompiledModule(job["source"], job["cflags"])
    except CompileFailed as exc:
        return {"compile_failure": {"reason": exc.reason, "message": exc.message}}, None, {}
    programs: dict[str, OwnedFd] = {}
    failures = {}
    for load in job["loads"]:
        try:
            programs[load["key"]] = module.load(load["function"], load["prog_type"], load["expected_attach_type"])
        except LoadFailed as exc:
            failures[load["key"]] = {"reason": exc.reason, "message": exc.message, "transient": exc.transient}
    header = {"compile_failure": None, "maps": list(module.maps()), "programs": list(programs), "failures": failures}
    return header, module, programs


def _load_object(job: dict[str, Any]) -> tuple[dict[str, Any], LoadedObject | None, dict[str, OwnedFd]]:
    """The answer's header for an object job, and what holds its fds."""
    global_data = {name: base64.b64decode(value) for name, value in job["global_data"].items()}
    try:
        loaded = load_object(base64.b64decode(job["object"]), global_data, [Load(**load) for load in job["loads"]])
    except CompileFailed as exc:
        return {"compile_failure": {"reason": exc.reason, "message": exc.message}}, None, {}
    failures = {
        key: {"reason": exc.reason, "message": exc.message, "transient": exc.transient}
        for key, exc in loaded.failures.items()
    }
    header = {
        "compile_failure": None,
        "maps": list(loaded.map_fds),
        "programs": list(loaded.programs),
        "failures": failures,
    }
    return header, loaded, loaded.programs


def _serve(fd: int, config: dict[str, Any]) -> None:
    if config["compiles"]:
        # Imported here, in the worker process, before its job arrives (a spare pays it ahead)
        # and before the sandbox closes (bcc's modules and libbcc are files outside it).
        from beekeeper.node_daemon import bcc_compile

        bcc_compile.capture_stderr_in_place()
    refusal = _confine(config)
    with socket.socket(fileno=fd) as sock:
        try:
            job = json.loads(_recv_frame(sock))
        except EOFError:
            return  # a spare the daemon no longer needs
        module: CompiledModule | LoadedObject | None = None
        programs: dict[str, OwnedFd] = {}
        if refusal is None:
            header, module, programs = (_build if config["compiles"] else _load_object)(job)
        else:
            header = {"compile_failure": {"reason": Reason.UNSUPPORTED_ON_NODE, "message": refusal}}
        maps = module.maps() if module is not None else {}
        _send_frame(sock, json.dumps({"maps": [], "programs": [], **header}).encode())
        _send_fds(sock, [*maps.values(), *(prog.fd for prog in programs.values())])


if __name__ == "__main__":
    _serve(int(sys.argv[1]), json.loads(sys.argv[2]))
