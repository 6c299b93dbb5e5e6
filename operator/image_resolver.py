"""The operator's one registry boundary: a BpfProgram's image reference -> a digest and a signature verdict.

A tag is resolved to a digest once (then kept, through status.image, for as long as the
reference is unchanged), so every node is told the same digest and runs the same bytes;
nodes only ever pull by digest. With a verification policy other than `off`, the digest's
cosign signature is checked against the cluster's trusted keys:

- `require`: only a Verified image rolls out; Unsigned or Invalid says why on the status
  and the nodes are not told to run it (a running older digest keeps running);
- `warn`: the image rolls out whatever the verdict, and the verdict shows on the status;
- `off`: nothing is checked (NotChecked).

Registry answers are cached (a digest's Verified verdict for the process' life, Unsigned and
Invalid re-checked after a minute, failures retried with back-off), so a pass never waits
on the registry for an image it has already judged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from beekeeper.node_daemon.oci_client import RegistryClient, RegistryError, parse_manifest
from beekeeper.node_daemon.oci_reference import BadReference, ImageReference, parse
from beekeeper.operator import signatures
from beekeeper.operator.signatures import Outcome, SignedLayer, TrustedKey, Verdict, load_keys

log = logging.getLogger(__name__)

RECHECK_SECONDS = 60.0
BACKOFF_FIRST = 2.0
BACKOFF_MAX = 60.0


POLICY_ENV = "BEEKEEPER_IMAGE_VERIFICATION"
KEYS_ENV = "BEEKEEPER_IMAGE_VERIFICATION_KEYS"
REGISTRY_CA_ENV = "BEEKEEPER_REGISTRY_CA_FILE"


class Policy(StrEnum):
    REQUIRE = "require"
    WARN = "warn"
    OFF = "off"


def read_keys(path: str) -> list[TrustedKey]:
    """The PEM public keys in a file, or in every file of a directory (a mounted Secret or ConfigMap)."""
    location = os.path.abspath(path)
    if os.path.isdir(location):
        names = sorted(n for n in os.listdir(location) if not n.startswith("."))  # skip the mount's ..data links
        files = [(n, os.path.join(location, n)) for n in names if os.path.isfile(os.path.join(location, n))]
    else:
        files = [(os.path.basename(location), location)]
    pem = []
    for name, file in files:
        try:
            with open(file, "rb") as handle:
                pem.append((name, handle.read()))
        except OSError as exc:
            raise ValueError(f"{KEYS_ENV}: cannot read {file}: {exc.strerror}") from None
    return load_keys(pem)


def from_environment() -> ImageResolver:
    """The resolver as the operator's flags (or their environment variables) configure it; bad settings raise."""
    raw = os.environ.get(POLICY_ENV) or Policy.OFF.value
    try:
        policy = Policy(raw)
    except ValueError:
        raise ValueError(f"{POLICY_ENV}={raw!r}: must be require, warn or off") from None
    keys_path = os.environ.get(KEYS_ENV)
    keys = read_keys(keys_path) if keys_path else []
    if policy != Policy.OFF and not keys:
        raise ValueError(
            f"image verification {policy.value} needs trusted keys: set {KEYS_ENV} (--image-verification-keys)"
        )
    ca_file = os.environ.get(REGISTRY_CA_ENV) or None
    if ca_file and not os.path.isfile(ca_file):
        raise ValueError(f"{REGISTRY_CA_ENV}={ca_file!r} is not a file")
    log.info("image verification", extra={"policy": policy.value, "keys": len(keys), "registryCA": bool(ca_file)})
    return ImageResolver(RegistryClient(ca_file=ca_file), policy, keys)


@dataclass(frozen=True)
class Resolution:
    """What the operator decided about one image reference."""

    reference: str
    """As written in the spec."""
    digest: str | None = None
    pinned: str | None = None
    """registry/repository[:tag]@digest: what the nodes are told to pull."""
    signature: Verdict = Verdict.NOT_CHECKED
    message: str = ""
    """Signature detail (who signed, or why not)."""
    error: str | None = None
    """Why it is not rolled out (resolution failed, or `require` and not Verified); None rolls out."""
    reason: str | None = None
    """CamelCase cause with error: InvalidImageReference, ImageResolutionFailed, SignatureNotVerified."""
    retry_in: float | None = None
    """Set when the registry could not be asked: the answer may differ later (nodes keep what they run)."""

    def status(self) -> dict[str, Any]:
        """BpfProgram status.image."""
        out: dict[str, Any] = {"reference": self.reference, "signature": self.signature.value}
        if self.digest:
            out["digest"] = self.digest
        if self.message:
            out["message"] = self.message[:1024]
        return out


@dataclass
class _Cached:
    value: str | Outcome
    until: float


class ImageResolver:
    """Resolves and judges image references for the reconcile pass (one thread at a time)."""

    def __init__(
        self,
        client: RegistryClient,
        policy: Policy = Policy.OFF,
        keys: Sequence[TrustedKey] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.policy = policy
        self.keys = list(keys)
        self.clock = clock
        self._digests: dict[str, str] = {}
        self._verdicts: dict[str, _Cached] = {}
        self._failures: dict[str, tuple[int, float, str]] = {}
        """key -> (attempts, retry_at, message) of registry calls that failed."""

    def resolve(self, reference: str, previous: Mapping[str, Any] | None = None) -> Resolution:
        """Digest and verdict for a reference; previous is the BpfProgram's status.image (keeps a resolved tag)."""
        try:
            ref = parse(reference)
        except BadReference as exc:
            return Resolution(reference, error=f"spec.bytecode.image: {exc}", reason="InvalidImageReference")
        digest = ref.digest or self._digests.get(reference)
        previous = previous or {}
        if digest is None and previous.get("reference") == reference and previous.get("digest"):
            digest = str(previous["digest"])  # resolved by an earlier pass, maybe by an earlier operator
        if digest is None:
            try:
                digest = self._call(f"resolve {reference}", lambda: self.client.resolve(ref))
            except _Later as later:
                return Resolution(
                    reference,
                    error=f"spec.bytecode.image: {later.message}",
                    reason="ImageResolutionFailed",
                    retry_in=later.retry_in,
                )
        self._digests[reference] = digest
        pinned = str(ref.pinned(digest))
        if self.policy == Policy.OFF:
            return Resolution(reference, digest, pinned)
        try:
            outcome = self._verdict(ref, digest)
        except _Later as later:
            if previous.get("digest") == digest and previous.get("signature") == Verdict.VERIFIED:
                signer = str(previous.get("message") or "").split(" (not re-checked", 1)[0]
                outcome = Outcome(Verdict.VERIFIED, f"{signer} (not re-checked: {later.message})")
            else:
                outcome = Outcome(Verdict.UNKNOWN, later.message)
                if self.policy == Policy.REQUIRE:
                    return Resolution(
                        reference,
                        digest,
                        pinned,
                        outcome.verdict,
                        outcome.message,
                        error=f"image signature not verified yet: {later.message}",
                        reason="SignatureNotVerified",
                        retry_in=later.retry_in,
                    )
                return Resolution(reference, digest, pinned, outcome.verdict, outcome.message, retry_in=later.retry_in)
        error = None
        if self.policy == Policy.REQUIRE and outcome.verdict != Verdict.VERIFIED:
            error = (
                f"image signature {outcome.verdict.value} and the cluster requires a verified one: {outcome.message}"
            )
        reason = "SignatureNotVerified" if error else None
        return Resolution(reference, digest, pinned, outcome.verdict, outcome.message, error, reason)

    def retry_in(self) -> float | None:
        """Seconds until the earliest failed registry call may be repeated."""
        if not self._failures:
            return None
        return max(0.0, min(at for _, at, _ in self._failures.values()) - self.clock())

    def _verdict(self, ref: ImageReference, digest: str) -> Outcome:
        cached = self._verdicts.get(digest)
        if cached is not None and self.clock() < cached.until:
            assert isinstance(cached.value, Outcome)
            return cached.value
        outcome = self._call(f"signature of {ref.name}@{digest}", lambda: self._check(ref, digest))
        forever = outcome.verdict == Verdict.VERIFIED
        self._verdicts[digest] = _Cached(outcome, float("inf") if forever else self.clock() + RECHECK_SECONDS)
        log.info("image signature", extra={"image": f"{ref.name}@{digest}", "verdict": outcome.verdict.value})
        return outcome

    def _check(self, ref: ImageReference, digest: str) -> Outcome:
        sig_ref = ImageReference(ref.registry, ref.repository, signatures.signature_tag(digest))
        try:
            body, content_type, sig_digest = self.client.manifest(sig_ref)
        except RegistryError as exc:
            if exc.reason == "ImageNotFound":
                return signatures.check([], self.keys, digest)
            raise
        manifest = parse_manifest(body, sig_digest, content_type)
        if isinstance(manifest, list):
            return Outcome(Verdict.INVALID, f"{sig_ref} is an image index, not a cosign signature image")
        layers = [
            SignedLayer(
                layer.media_type,
                layer.annotations.get(signatures.SIGNATURE_ANNOTATION),
                self.client.blob(sig_ref, layer, signatures.MAX_PAYLOAD)
                if layer.media_type == signatures.SIMPLE_SIGNING
                else b"",
            )
            for layer in manifest.layers
        ]
        return signatures.check(layers, self.keys, digest)

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        attempts, retry_at, message = self._failures.get(what, (0, 0.0, ""))
        now = self.clock()
        if now < retry_at:
            raise _Later(message, retry_at - now)  # no countdown in the text: the status stays as written
        try:
            value = call()
        except RegistryError as exc:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempts)
            self._failures[what] = (attempts + 1, now + delay, f"{exc.reason}: {exc}")
            log.warning("registry call failed", extra={"call": what, "reason": exc.reason, "retryIn": delay})
            raise _Later(f"{exc.reason}: {exc}", delay) from None
        self._failures.pop(what, None)
        return value


class _Later(Exception):
    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_in = retry_in
