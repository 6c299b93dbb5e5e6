"""Compiling a unit's C with bcc and loading its functions, capturing every diagnostic.

This runs bcc in the calling process: user programs are built in a compile worker
(compile_worker), so a compiler crash takes down only that worker. The daemon itself never
compiles (its own policy datapath is a prebuilt object); in-process builds are the tests'
and benchmarks' (the previous release's bcc-built datapath, to upgrade from).

clang and libbcc print compile errors and verifier logs straight to file descriptor 2,
not to a Python stream, so fd 2 is redirected to a temporary file while bcc runs. The
redirect is process-wide: a lock serializes it, and whatever else was written to stderr
in that window is re-logged at debug level rather than lost. A compile worker instead
keeps fd 2 on the file its parent reads (capture_stderr_in_place), so what LLVM printed
before calling exit() survives the worker. bcc's own attach helpers are never used (they
tie attachments to this process); the module is only a factory for verified program fds
and map fds, which the caller pins, then closes.
"""

from __future__ import annotations

import atexit
import ctypes as ct
import errno
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from bcc import BPF, lib

from beekeeper.node_daemon.backend import Reason
from beekeeper.node_daemon.bpf_syscalls import OwnedFd
from beekeeper.node_daemon.compile_errors import CompileFailed, LoadFailed, compile_error_message, verifier_message

log = logging.getLogger(__name__)

_STDERR_LOCK = threading.Lock()
_in_place = False
_VERIFIER_LOG_SIZE = 256 * 1024  # the kernel keeps the tail when the log is longer
_TRANSIENT_ERRNOS = frozenset({errno.EPERM, errno.ENOMEM, errno.EAGAIN, errno.EBUSY, errno.EINTR})

lib.bpf_num_tables.restype = ct.c_size_t
lib.bpf_num_tables.argtypes = [ct.c_void_p]
lib.bpf_table_name.restype = ct.c_char_p
lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
lib.bpf_table_fd_id.restype = ct.c_int
lib.bpf_table_fd_id.argtypes = [ct.c_void_p, ct.c_size_t]


@dataclass
class Captured:
    text: str = ""


def capture_stderr_in_place() -> None:
    """Capture by reading back what was appended to fd 2 (a regular file) instead of
    redirecting it: nothing is lost if the compiler ends the process mid-capture."""
    global _in_place
    _in_place = True


@contextmanager
def captured_stderr() -> Iterator[Captured]:
    """Everything written to fd 2 inside the block, available after it exits."""
    captured = Captured()
    if _in_place:
        with _STDERR_LOCK:
            sys.stderr.flush()
            start = os.lseek(2, 0, os.SEEK_END)
            try:
                yield captured
            finally:
                end = os.lseek(2, 0, os.SEEK_END)
                captured.text = os.pread(2, end - start, start).decode(errors="replace")
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode(errors="replace")
            if captured.text:
                log.debug("bcc output:\n%s", captured.text.rstrip())


class _UnattachedBPF(BPF):
    """bcc's BPF without its name-based auto-attach (kprobe__*, tracepoint__*, ...):
    beekeeper attaches only what the spec says, through pinned links."""

    def _trace_autoload(self) -> None:
        pass


class CompiledModule:
    """A compiled unit: its maps exist in the kernel, its functions can be loaded."""

    def __init__(self, source: str, cflags: Sequence[str]) -> None:
        self.source = source
        failure: Exception | None = None
        with captured_stderr() as out:
            try:
                self._bpf = _UnattachedBPF(text=source.encode(), cflags=list(cflags))
            except Exception as exc:  # bcc raises bare Exception; the detail is on stderr
                failure = exc
        if failure is not None:
            raise CompileFailed(compile_error_message(out.text or str(failure)))

    def load(self, function: str, prog_type: int, expected_attach_type: int | None = None) -> OwnedFd:
        """Load and verify one function as a program of prog_type; raises LoadFailed."""
        module = self._bpf.module
        name = function.encode()
        start = lib.bpf_function_start(module, name)
        if not start:
            raise LoadFailed(
                Reason.FUNCTION_NOT_FOUND,
                f"no function {function!r} in the source; name a non-static C function of this unit",
            )
        log_buf = ct.create_string_buffer(_VERIFIER_LOG_SIZE)
        with captured_stderr() as out:
            fd = lib.bcc_func_load(
                module,
                prog_type,
                name,
                start,
                lib.bpf_function_size(module, name),
                lib.bpf_module_license(module),
                lib.bpf_module_kern_version(module),
                0,  # log level: bcc retries with a log into log_buf only if the load fails
                log_buf,
                len(log_buf),
                None,
                -1 if expected_attach_type is None else expected_attach_type,
            )
            err = ct.get_errno()
        if fd >= 0:
            return OwnedFd(fd)
        verifier_log = log_buf.value.decode(errors="replace")
        if verifier_log.strip() and err not in _TRANSIENT_ERRNOS:
            hints = [line for line in out.text.splitlines() if line.startswith("HINT:")]
            raise LoadFailed(Reason.VERIFIER_REJECTED, verifier_message(function, verifier_log, self.source, hints))
        raise LoadFailed(
            Reason.LOAD_FAILED,
            f"loading {function} failed: {os.strerror(err)}",
            transient=err in _TRANSIENT_ERRNOS,
        )

    def maps(self) -> dict[str, int]:
        """Map name -> fd (owned by the module; pin them before close())."""
        module = self._bpf.module
        return {
            lib.bpf_table_name(module, i).decode(): lib.bpf_table_fd_id(module, i)
            for i in range(lib.bpf_num_tables(module))
        }

    def close(self) -> None:
        """Close the module's fds; pinned objects stay in the kernel."""
        self._bpf.cleanup()
        atexit.unregister(self._bpf.cleanup)

    def __enter__(self) -> CompiledModule:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
