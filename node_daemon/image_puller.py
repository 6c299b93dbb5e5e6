"""Bytecode for a digest-pinned image reference: from the node's cache, else pulled once and cached.

A failed pull is remembered per reference with exponential back-off (a registry outage
is not hammered by every reconcile, and the daemon knows when to look again); a digest
mismatch or a malformed image backs off longest, since retrying soon will not fix it.
Only references pinned by digest are pulled: the operator resolves tags, so every node
runs the same bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from beekeeper.node_daemon import bytecode_image
from beekeeper.node_daemon.bytecode_image import BytecodeImage
from beekeeper.node_daemon.object_cache import ObjectCache
from beekeeper.node_daemon.oci_client import DigestMismatch, InvalidImage, RegistryClient, RegistryError
from beekeeper.node_daemon.oci_reference import BadReference, parse

log = logging.getLogger(__name__)

BACKOFF_FIRST = 2.0
BACKOFF_MAX = 60.0
BACKOFF_PERMANENT = 300.0
"""After a digest mismatch or an image that is not bytecode: the same bytes will come back."""


class PullFailed(RegistryError):
    """A pull that failed (now or within the back-off window): reason and message for the status."""

    def __init__(self, reason: str, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_in = retry_in


@dataclass
class _Failure:
    reason: str
    message: str
    attempts: int
    retry_at: float


class ImagePuller:
    """One per daemon; called from the reconcile loop only."""

    def __init__(self, client: RegistryClient, cache: ObjectCache, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.cache = cache
        self.clock = clock
        self._failures: dict[str, _Failure] = {}
        self.pulls = 0
        """Images pulled from a registry (cache misses) since the start."""

    def fetch(self, reference: str) -> BytecodeImage:
        """The bytecode of a reference pinned by digest; raises PullFailed."""
        try:
            ref = parse(reference)
        except BadReference as exc:
            raise PullFailed("InvalidImageReference", str(exc), BACKOFF_PERMANENT) from None
        if ref.digest is None:
            raise PullFailed("InvalidImageReference", f"{reference} is not pinned by digest", BACKOFF_PERMANENT)
        cached = self.cache.get(ref.digest)
        if cached is not None:
            self._failures.pop(reference, None)
            return cached
        failure = self._failures.get(reference)
        now = self.clock()
        if failure is not None and now < failure.retry_at:
            wait = failure.retry_at - now
            raise PullFailed(failure.reason, f"{failure.message} (retrying in {wait:.0f}s)", wait)
        started = time.monotonic()
        try:
            manifest = self.client.image_manifest(ref)
            layer = manifest.layers[bytecode_image.bytecode_layer(manifest)]
            labels = bytecode_image.read_labels(self.client.blob(ref, manifest.config, bytecode_image.MAX_CONFIG))
            elf = bytecode_image.extract_object(self.client.blob(ref, layer, bytecode_image.MAX_LAYER), labels.filename)
        except RegistryError as exc:
            attempts = failure.attempts + 1 if failure else 1
            permanent = isinstance(exc, DigestMismatch | InvalidImage)
            delay = BACKOFF_PERMANENT if permanent else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempts - 1))
            self._failures[reference] = _Failure(exc.reason, str(exc), attempts, now + delay)
            log.warning("image pull failed", extra={"image": reference, "reason": exc.reason, "attempts": attempts})
            raise PullFailed(exc.reason, f"{exc} (retrying in {delay:.0f}s)", delay) from None
        image = BytecodeImage(ref.digest, elf, labels)
        self.cache.put(image)
        self.pulls += 1
        self._failures.pop(reference, None)
        log.info(
            "image pulled",
            extra={"image": reference, "bytes": len(elf), "seconds": round(time.monotonic() - started, 3)},
        )
        return image

    def retry_in(self) -> float | None:
        """Seconds until the earliest failed pull may be tried again (None when nothing failed)."""
        if not self._failures:
            return None
        return max(0.0, min(f.retry_at for f in self._failures.values()) - self.clock())

    def forget(self, keep: set[str]) -> None:
        """Drop back-off state and prune cached objects of references no program uses any more."""
        for reference in set(self._failures) - keep:
            del self._failures[reference]
        digests = []
        for reference in keep:
            try:
                digest = parse(reference).digest
            except BadReference:
                continue
            if digest:
                digests.append(digest)
        for gone in self.cache.prune(digests):
            log.info("pruned cached image", extra={"digest": gone})
