"""The node's cache of pulled bytecode, content-addressed by the image's manifest digest.

A daemon restart, or a second BpfProgram on the same digest, finds the object here and
pulls nothing. Entries are written whole (temporary directory, then rename) and checked
on every read against the sha256 recorded at write time, so a torn or tampered file is
dropped and pulled again rather than loaded. The cache is bounded in bytes; the least
recently used entries no program needs are pruned first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from beekeeper.node_daemon.bytecode_image import BytecodeImage, BytecodeLabels

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_OBJECT = "object.o"
_META = "meta.json"


def _entry_name(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or len(hex_digest) != 64 or not all(c in "0123456789abcdef" for c in hex_digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hex_digest


class ObjectCache:
    """Directory of <manifest sha256>/{object.o, meta.json}; one process uses it at a time (the daemon)."""

    def __init__(self, directory: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.dir.glob(".tmp-*"):  # a write interrupted by a crash
            shutil.rmtree(stale, ignore_errors=True)

    def get(self, digest: str) -> BytecodeImage | None:
        """The cached image of that manifest digest, or None (missing or failing its check: then removed)."""
        entry = self.dir / _entry_name(digest)
        try:
            meta = json.loads((entry / _META).read_text())
            elf = (entry / _OBJECT).read_bytes()
        except (OSError, ValueError):
            if entry.exists():
                log.warning("dropping unreadable cache entry", extra={"digest": digest})
                shutil.rmtree(entry, ignore_errors=True)
            return None
        if meta.get("digest") != digest or hashlib.sha256(elf).hexdigest() != meta.get("objectSha256"):
            log.warning("dropping cache entry that fails its checksum", extra={"digest": digest})
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)  # recency for pruning
        labels = BytecodeLabels(meta.get("programs") or {}, meta.get("maps") or {}, meta.get("filename"))
        return BytecodeImage(digest, elf, labels)

    def put(self, image: BytecodeImage) -> None:
        """Store an image (whole or not at all)."""
        name = _entry_name(image.digest)
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        (tmp / _OBJECT).write_bytes(image.elf)
        meta = {
            "digest": image.digest,
            "objectSha256": hashlib.sha256(image.elf).hexdigest(),
            "programs": dict(image.labels.programs),
            "maps": dict(image.labels.maps),
            "filename": image.labels.filename,
            "pulledAt": time.time(),
        }
        (tmp / _META).write_text(json.dumps(meta, sort_keys=True))
        target = self.dir / name
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def digests(self) -> list[str]:
        return sorted(f"sha256:{p.name}" for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove least recently used entries not in keep until the cache fits max_bytes; returns what went."""
        keep_names = {_entry_name(d) for d in keep}
        entries = []
        total = 0
        for path in self.dir.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            total += size
            entries.append((path.stat().st_mtime, path, size))
        removed = []
        for _, path, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if path.name in keep_names:
                continue
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed.append(f"sha256:{path.name}")
        return removed
