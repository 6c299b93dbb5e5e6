"""Confining a process's file access to a few read-only trees with Landlock (Linux 5.13+).

The compile worker calls restrict_reads() once it has imported everything it needs: from
then on clang can open only the kernel headers (and the tracefs formats bcc reads for
TRACEPOINT_PROBE), so `#include "/etc/shadow"`, however its path is spelled (`#include
MACRO` builds it at preprocessing time), fails with EACCES instead of echoing the file.
Landlock checks every open in the kernel, so no pre-scan of the source can be bypassed.
The restriction is inherited and cannot be lifted; that is why it runs in a child.
"""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Iterable

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_ABI_ACCESS = {1: (1 << 13) - 1, 2: 1 << 13, 3: 1 << 14, 5: 1 << 15}
"""Filesystem rights each ABI version added (ABI 1: execute ... make_sym; 2: refer;
3: truncate; 5: ioctl_dev). All known rights are handled, so all are denied unless granted."""

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class _RulesetAttr(ct.Structure):
    _fields_ = [("handled_access_fs", ct.c_uint64)]


class _PathBeneathAttr(ct.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ct.c_uint64), ("parent_fd", ct.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is not built in or not enabled."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ct.c_size_t(0), ct.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def restrict_reads(paths: Iterable[str]) -> None:
    """From now on this process (and its children) may only read files under paths and
    change no file at all; already open descriptors keep working. Raises OSError when the
    kernel cannot enforce it; paths that do not exist are skipped."""
    abi = abi_version()
    if abi == 0:
        raise OSError("Landlock is not available on this kernel (needs Linux 5.13+ with landlock in lsm=)")
    handled = 0
    for version, rights in _ABI_ACCESS.items():
        if abi >= version:
            handled |= rights
    attr = _RulesetAttr(handled)
    ruleset = _checked(_libc.syscall(_SYS_CREATE_RULESET, ct.byref(attr), ct.c_size_t(ct.sizeof(attr)), 0), "ruleset")
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                access = _READ_FILE | (_READ_DIR if os.path.isdir(path) else 0)
                rule = _PathBeneathAttr(access, fd)
                _checked(_libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ct.byref(rule), 0), path)
            finally:
                os.close(fd)
        _checked(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _checked(_libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0), "restrict_self")
    finally:
        os.close(ruleset)


def _checked(ret: int, what: str) -> int:
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return int(ret)
