"""The kernel hooks a BpfProgram function can attach to.

Kept free of pydantic: the node daemon's build workers import these names with the backend,
and each worker is a fresh process, so the models' import time would be paid on every build.
"""

from __future__ import annotations

from enum import StrEnum


class ProgramType(StrEnum):
    """The kernel hook a function attaches to; it decides which attach fields apply."""

    XDP = "xdp"
    TC = "tc"
    TRACEPOINT = "tracepoint"
    RAW_TRACEPOINT = "raw_tracepoint"
    UPROBE = "uprobe"
    URETPROBE = "uretprobe"
    KPROBE = "kprobe"
    KRETPROBE = "kretprobe"
    CGROUP_SKB = "cgroup_skb"
    CGROUP_SOCK_ADDR = "cgroup_sock_addr"
    FENTRY = "fentry"
    FEXIT = "fexit"
    LSM = "lsm"


BYTECODE_ONLY_TYPES = (ProgramType.FENTRY, ProgramType.FEXIT, ProgramType.LSM)
"""Types attached through the kernel's BTF: prebuilt objects only (bcc source cannot name them)."""
