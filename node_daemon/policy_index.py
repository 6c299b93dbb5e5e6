"""Stable numbers for policy names: the datapath keys counters and verdicts by a u32 index.

The kernel keeps those numbers after the daemon exits (counters, conntrack entries, drop
events in flight), so a restarted daemon must give every policy the number it had, or
it would report one policy's drops under another's name. The table is persisted in the
daemon's state directory. Numbers are never reused while the table has unused ones left:
a deleted policy's number stays retired, so nothing still carrying it is misattributed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from beekeeper.node_daemon.policy_maps import NO_POLICY

log = logging.getLogger(__name__)


class PolicyIndexes:
    """name ("namespace/name") -> index, persisted at path."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._indexes: dict[str, int] = {}
        self._next = 0
        try:
            saved = json.loads(self.path.read_text())
            self._indexes = {str(k): int(v) for k, v in saved["indexes"].items()}
            self._next = int(saved["next"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("policy index table unreadable; starting a new one", extra={"path": str(path), "error": exc})

    def assign(self, names: Iterable[str]) -> dict[str, int]:
        """Indexes for exactly these names: known ones keep theirs, new ones get fresh ones."""
        wanted = set(names)
        table = {name: index for name, index in self._indexes.items() if name in wanted}
        used = set(table.values())
        for name in sorted(wanted - set(table)):
            while self._next in used or self._next == NO_POLICY:
                self._next = (self._next + 1) % NO_POLICY
            table[name] = self._next
            used.add(self._next)
            self._next = (self._next + 1) % NO_POLICY
        if table != self._indexes:
            self._indexes = table
            self._save()
        return dict(table)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump({"next": self._next, "indexes": self._indexes}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
