"""What the daemon knows about each unit it put in the kernel, persisted across restarts.

bpffs holds only BPF objects, so the description of those objects (which build a link
runs, which spec a link serves, attach parameters) lives in one JSON file per unit under
the state directory, written atomically (write, fsync, rename). The pins stay the source
of truth for what exists: on adoption, entries whose pins vanished are dropped, program
ids are re-read from the kernel, and pins no record mentions are removed.

Pin layout under the base directory (one base directory per node):

    <unit>/<build>/progs/<function>:<type>[:<attach>]   verified programs of one build
    <unit>/<build>/maps/<map name>                       maps of one build (shared by its programs)
    <unit>/links/<slot>                                  one link per attachment

A build is one compile of the unit's source ("<content hash[:12]>-<n>"). Links are pinned
per unit, not per build, because BPF_LINK_UPDATE moves a link from one build to the next
without re-creating it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LINKS_DIR = "links"


@dataclass
class Failure:
    reason: str
    message: str
    transient: bool = False
    """Worth a rebuild on the next apply (e.g. ENOMEM), unlike a compile or verifier error."""


@dataclass
class ProgramRecord:
    function: str
    type: str
    pin: str
    prog_id: int


@dataclass
class BuildRecord:
    build_id: str
    content_hash: str
    programs: dict[str, ProgramRecord] = field(default_factory=dict)
    """load key -> loaded program."""
    failures: dict[str, Failure] = field(default_factory=dict)
    """load key -> why it did not load."""
    compile_failure: Failure | None = None
    maps: dict[str, str] = field(default_factory=dict)
    """map name -> pin (relative to the unit directory)."""

    @property
    def final(self) -> bool:
        """A rebuild of the same content would not do better."""
        failures = [*self.failures.values(), *([self.compile_failure] if self.compile_failure else [])]
        return not any(f.transient for f in failures)


@dataclass
class LinkRecord:
    slot: str
    point: str
    kind: str
    load_key: str
    build_id: str
    prog_id: int
    pin: str
    params: dict[str, Any] = field(default_factory=dict)
    ident: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitRecord:
    key: str
    dirname: str
    content_hash: str = ""
    current: str | None = None
    """Build id serving the content hash last applied."""
    next_seq: int = 1
    builds: dict[str, BuildRecord] = field(default_factory=dict)
    links: dict[str, LinkRecord] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        doc = json.loads(text)
        if doc.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"unknown state format (want {FORMAT_VERSION})")
        builds = {}
        for bid, b in doc.pop("builds").items():
            cf = b.pop("compile_failure")
            builds[bid] = BuildRecord(
                programs={k: ProgramRecord(**p) for k, p in b.pop("programs").items()},
                failures={k: Failure(**f) for k, f in b.pop("failures").items()},
                compile_failure=Failure(**cf) if cf else None,
                **b,
            )
        links = {slot: LinkRecord(**rec) for slot, rec in doc.pop("links").items()}
        return cls(builds=builds, links=links, **doc)


def safe_name(text: str, limit: int = 96) -> str:
    """A bpffs file name for text that stays readable and unique (a hash suffix when altered).

    bpffs refuses names with a dot (reserved for its own files), so dots are replaced too.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_@:+-]", "_", text) or "_"
    if cleaned == text and len(text) <= limit:
        return text
    return f"{cleaned[:limit]}~{hashlib.sha256(text.encode()).hexdigest()[:10]}"


class StateStore:
    """One JSON file per unit in a directory of its own, owned by one process at a time.

    Two daemons converging the same pins would undo each other's work (a DaemonSet rolling
    update with surge starts the new pod before the old one exits), so the store is locked
    with flock(2); the kernel releases the lock when its holder dies, even by SIGKILL.
    """

    def __init__(self, state_dir: str, lock_timeout: float = 60.0) -> None:
        self.dir = Path(state_dir) / "units"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(Path(state_dir) / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._lock_fd)
                    raise RuntimeError(
                        f"another process holds {state_dir}/lock: only one node daemon may manage a state "
                        "directory; stop the other one or give this one its own state and bpffs directories"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

    def close(self) -> None:
        """Release the lock (also released if the process dies)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def load_all(self) -> list[UnitRecord]:
        for partial in self.dir.glob("*.partial"):  # a write interrupted by a crash
            partial.unlink()
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(UnitRecord.from_json(path.read_text()))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("ignoring unreadable unit state %s (%s); its pins will be removed", path, exc)
        return records

    def save(self, record: UnitRecord) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f"{record.dirname}.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{record.dirname}.json")

    def delete(self, record: UnitRecord) -> None:
        (self.dir / f"{record.dirname}.json").unlink(missing_ok=True)
