"""The runtime-security datapath's numbers and layouts, as bpf/runtime_security.c defines them.

Keys, values and the event record are packed here exactly as the C structs lay them out
(a kernel test compares the sizes with the object's maps); verdict merging is pure.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

KEY_CGROUP = 1
KEY_MNTNS = 2

HOOK_NAMES = {1: "lsm", 2: "tracepoint"}
MATCH_NAMES = {1: "path", 2: "prefix", 3: "default"}


class Action(IntEnum):
    """What the datapath does; a larger number is a stronger verdict."""

    ALLOW = 1
    AUDIT = 2
    BLOCK = 3


SCOPE_KEY = struct.Struct("<IIQ")  # kind, pad, id
SCOPE_VALUE = struct.Struct("<I")
FILE_KEY = struct.Struct("<IIQ")  # scope, dev, ino
VERDICT = struct.Struct("<IBB2x")  # rule, action, prefix
DEFAULT_KEY = struct.Struct("<I")
COUNT_KEY = struct.Struct("<I")
COUNT_VALUE = struct.Struct("<Q")
PATH_LEN = 256
NAME_LEN = 64
EVENT = struct.Struct(f"<QQQIIIIIIBBB5x16s16s{NAME_LEN}s{PATH_LEN}s")


@dataclass(frozen=True)
class MapSpec:
    name: str
    key_size: int
    value_size: int
    max_entries: int


MAP_SPECS = (
    MapSpec("rs_scopes", SCOPE_KEY.size, SCOPE_VALUE.size, 16384),
    MapSpec("rs_files", FILE_KEY.size, VERDICT.size, 65536),
    MapSpec("rs_defaults", DEFAULT_KEY.size, VERDICT.size, 16384),
    MapSpec("rs_counts", COUNT_KEY.size, COUNT_VALUE.size, 16384),
    MapSpec("rs_events", 0, 0, 256 * 1024),
)
SYNCED_MAPS = ("rs_files", "rs_defaults", "rs_scopes")
"""In the order additions are written (removals go in reverse)."""


def kernel_dev(st_dev: int) -> int:
    """The kernel's dev_t (major << 20 | minor, what super_block.s_dev holds) of a stat() st_dev."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def rule_id(policy: str, rule: str, action: Action, configured: str) -> int:
    """A stable id per (policy, rule, effective and configured action): counters pinned in the
    kernel keep meaning the same rule across daemon restarts. Never 0."""
    return (zlib.crc32(f"{policy}\0{rule}\0{action.name}\0{configured}".encode()) & 0x7FFFFFFF) or 1


@dataclass(frozen=True)
class Event:
    """One exec the datapath matched (Block or Audit), as the ring buffer carries it."""

    boot_ns: int
    cgroup_id: int
    ino: int
    dev: int
    pid: int
    ppid: int
    scope: int
    rule: int
    mntns: int
    action: Action
    hook: str
    match: str
    comm: str
    parent_comm: str
    parent_exe: str
    filename: str

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        if len(raw) != EVENT.size:  # struct rs_event and EVENT disagree: a build mismatch, never silently misread
            raise ValueError(f"exec event of {len(raw)} bytes, this daemon reads {EVENT.size}")
        f = EVENT.unpack(raw)

        def text(b: bytes) -> str:
            return b.split(b"\0", 1)[0].decode(errors="replace")

        return cls(
            f[0],
            f[1],
            f[2],
            f[3],
            f[4],
            f[5],
            f[6],
            f[7],
            f[8],
            Action(f[9]),
            HOOK_NAMES.get(f[10], str(f[10])),
            MATCH_NAMES.get(f[11], str(f[11])),
            text(f[12]),
            text(f[13]),
            text(f[14]),
            text(f[15]),
        )
