"""Builds that ended the node daemon: marked while they run, quarantined after the second.

Builds run in compile workers, so a user's program should never end the daemon; this is
the last line for whatever still could (the OOM killer choosing the daemon while it pins a
huge build, a bug in the daemon). Before a build the daemon writes "building unit U at
content hash H" into the state directory and removes it afterwards, so a marker found at
start-up means the previous run ended during that build. One such exit proves nothing (a
rolling update or an operator may SIGKILL the daemon mid-build, which looks the same), so
the build is retried once; if the run retrying it ends during the same build again, the
unit at that hash is quarantined: reported Failed (Quarantined) and never built again
until its source, flags or program list change. The marker of a quarantined build stays,
which keeps the quarantine across restarts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

QUARANTINE_AFTER = 2
"""Consecutive daemon runs that ended while building the same unit at the same hash."""


class BuildGuard:
    """One marker file per unit directory name under state_dir/building."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "building"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ended: dict[str, tuple[str, int]] = {}
        """Unit dirname -> (content hash, runs that ended building it), found at start-up."""
        for path in self.dir.glob("*.json"):
            try:
                doc = json.loads(path.read_text())
                self._ended[path.stem] = (doc["content_hash"], int(doc["interrupted"]) + 1)
            except (ValueError, KeyError, TypeError):
                path.unlink()
                continue
            log.warning(
                "the previous run ended while building unit %s (content hash %s): %d time(s) in a row",
                doc.get("key"),
                doc["content_hash"][:12],
                self._ended[path.stem][1],
            )

    def begin(self, dirname: str, key: str, content_hash: str) -> int:
        """Mark the build started; returns how many runs in a row ended during this very build
        (QUARANTINE_AFTER or more: do not build it)."""
        ended_hash, ended = self._ended.get(dirname, ("", 0))
        interrupted = ended if ended_hash == content_hash else 0
        if interrupted < QUARANTINE_AFTER:
            doc = {"key": key, "content_hash": content_hash, "interrupted": interrupted}
            tmp = self.dir / f"{dirname}.partial"
            with open(tmp, "w") as f:
                f.write(json.dumps(doc))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / f"{dirname}.json")
        return interrupted

    def end(self, dirname: str) -> None:
        """The build finished (whatever its outcome: the daemon survived it), or the unit is
        gone and with it any quarantine."""
        self._ended.pop(dirname, None)
        (self.dir / f"{dirname}.json").unlink(missing_ok=True)
