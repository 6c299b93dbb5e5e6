"""A small client of the OCI distribution API: manifests (image index -> this platform) and blobs.

Everything fetched is checked against the digest that names it: a manifest against the
pinned (or resolved) digest, every blob against its descriptor's digest and size, so a
registry or a proxy in between can never hand over other bytes than the ones pinned.
Authentication follows the registry's WWW-Authenticate challenge: anonymous, Basic, or a
Bearer token from the realm it names (Docker Hub, quay.io, GHCR, Harbor, distribution's
token auth), with the credentials given for that registry, if any.

Bodies are read with a size bound, so a hostile registry cannot exhaust the reader's memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from beekeeper.node_daemon.oci_reference import ImageReference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

MAX_MANIFEST = 4 * 1024 * 1024
"""The distribution registry's own limit for a manifest."""
DEFAULT_TIMEOUT = 10.0

Credentials = Callable[[str], tuple[str, str] | None]
"""Registry host -> (username, password) for it, or None for anonymous access."""


class RegistryError(Exception):
    """A pull failed; `reason` is the CamelCase cause for a status, the message the detail."""

    reason = "ImagePullFailed"


class ImageNotFound(RegistryError):
    reason = "ImageNotFound"


class RegistryUnavailable(RegistryError):
    """The registry did not answer, or answered 5xx: worth retrying later."""

    reason = "RegistryUnavailable"


class Unauthorized(RegistryError):
    reason = "ImagePullUnauthorized"


class DigestMismatch(RegistryError):
    """Bytes whose sha256 is not the digest that names them: never used, and not retried soon."""

    reason = "DigestMismatch"


class InvalidImage(RegistryError):
    reason = "InvalidImage"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, where: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise InvalidImage(f"{where}: descriptor is not an object")
        digest, size = raw.get("digest"), raw.get("size")
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
            raise InvalidImage(f"{where}: digest {digest!r} is not a sha256 digest")
        if not isinstance(size, int) or size < 0:
            raise InvalidImage(f"{where}: size {size!r} is not a byte count")
        annotations = raw.get("annotations") or {}
        platform = raw.get("platform") or {}
        if not isinstance(annotations, dict) or not isinstance(platform, dict):
            raise InvalidImage(f"{where}: annotations and platform must be objects")
        return cls(str(raw.get("mediaType") or ""), digest, size, annotations, platform)


@dataclass(frozen=True)
class Manifest:
    """One image manifest (not an index): its config and layers, and the digest it was fetched by."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_manifest(data: bytes, digest: str, content_type: str = "") -> Manifest | list[Descriptor]:
    """An image manifest, or the entries of an image index (media type from the body, else the header)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidImage(f"manifest {digest} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise InvalidImage(f"manifest {digest} is not an OCI or Docker v2 manifest (schemaVersion 2)")
    media_type = doc.get("mediaType") or content_type.split(";")[0].strip()
    if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidImage(f"image index {digest} has no manifests list")
        return [Descriptor.parse(e, f"image index {digest} manifests[{i}]") for i, e in enumerate(entries)]
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidImage(f"manifest {digest} has no layers list (media type {media_type or 'unset'})")
    return Manifest(
        digest=digest,
        media_type=media_type or OCI_MANIFEST,
        config=Descriptor.parse(doc.get("config"), f"manifest {digest} config"),
        layers=tuple(Descriptor.parse(layer, f"manifest {digest} layers[{i}]") for i, layer in enumerate(layers)),
        annotations=doc.get("annotations") or {},
        raw=data,
    )


def select_platform(entries: list[Descriptor], os: str, architecture: str, where: str) -> Descriptor:
    """The index entry for this node's platform (os/architecture), as container runtimes pick it."""
    for entry in entries:
        if entry.platform.get("os") == os and entry.platform.get("architecture") == architecture:
            return entry
    offered = ", ".join(f"{e.platform.get('os', '?')}/{e.platform.get('architecture', '?')}" for e in entries)
    raise ImageNotFound(f"{where} has no {os}/{architecture} image (offers {offered or 'nothing'})")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm, service, scope})."""
    scheme, _, params = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', params)}


def _registry_message(body: bytes) -> str:
    """The registry's own error words ({"errors":[{"code","message"}]}), if it sent any."""
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)[:300]
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""


class _NoAuthRedirect(urllib.request.HTTPRedirectHandler):
    """Blob downloads may redirect to storage (S3, a CDN): follow, but never carry the registry token along."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.remove_header("Authorization")
        return new


class RegistryClient:
    """Reads manifests and blobs; one instance per process keeps the tokens it was given."""

    def __init__(
        self,
        ca_file: str | None = None,
        credentials: Credentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoAuthRedirect())
        self._credentials = credentials or (lambda _host: None)
        self._timeout = timeout
        self._tokens: dict[tuple[str, str], str] = {}
        self.requests = 0
        """HTTP requests sent so far (what a cache saves shows here)."""

    def manifest(self, ref: ImageReference) -> tuple[bytes, str, str]:
        """(body, content type, digest) of the manifest the reference names; a pinned digest is checked."""
        target = ref.digest or ref.tag or "latest"
        body, headers = self._get(ref, f"manifests/{target}", ACCEPT, MAX_MANIFEST, f"manifest of {ref}")
        digest = sha256_digest(body)
        if ref.digest and digest != ref.digest:
            raise DigestMismatch(f"{ref}: the registry sent a manifest hashing to {digest}, not to the pinned digest")
        return body, headers.get("Content-Type", ""), digest

    def resolve(self, ref: ImageReference) -> str:
        """The digest a tag points to now (a pinned reference is checked and returned as is)."""
        return self.manifest(ref)[2]

    def image_manifest(self, ref: ImageReference, os: str = "linux", architecture: str = "amd64") -> Manifest:
        """The image manifest for this platform; an image index is followed to its entry (checked too)."""
        body, content_type, digest = self.manifest(ref)
        parsed = parse_manifest(body, digest, content_type)
        if isinstance(parsed, Manifest):
            return parsed
        entry = select_platform(parsed, os, architecture, f"image index {ref}")
        child = self.manifest(ref.pinned(entry.digest))
        result = parse_manifest(child[0], entry.digest, child[1])
        if not isinstance(result, Manifest):
            raise InvalidImage(f"{ref}: index entry {entry.digest} is itself an index")
        return result

    def blob(self, ref: ImageReference, descriptor: Descriptor, max_size: int) -> bytes:
        """A blob, checked against its descriptor's size and sha256."""
        if descriptor.size > max_size:
            raise InvalidImage(f"{ref}: blob {descriptor.digest} is {descriptor.size} bytes, over {max_size}")
        body, _ = self._get(ref, f"blobs/{descriptor.digest}", "*/*", max_size, f"blob {descriptor.digest} of {ref}")
        actual = sha256_digest(body)
        if actual != descriptor.digest or len(body) != descriptor.size:
            raise DigestMismatch(
                f"{ref}: blob {descriptor.digest} arrived as {len(body)} bytes hashing to {actual} "
                f"(descriptor: {descriptor.size} bytes)"
            )
        return body

    def _get(self, ref: ImageReference, path: str, accept: str, limit: int, what: str) -> tuple[bytes, Message]:
        url = f"https://{ref.api_host}/v2/{ref.repository}/{path}"
        scope = f"repository:{ref.repository}:pull"
        authorization = self._tokens.get((ref.api_host, scope))
        for attempt in range(2):
            status, headers, body = self._send(url, accept, authorization, limit, what)
            if status == 401 and attempt == 0:
                authorization = self._authorize(ref.api_host, scope, headers.get("WWW-Authenticate", ""), what)
                continue
            break
        if status == 200:
            return body, headers
        detail = _registry_message(body)
        detail = f" ({detail})" if detail else ""
        if status == 404:
            raise ImageNotFound(f"{what}: not found in the registry{detail}")
        if status in (401, 403):
            raise Unauthorized(f"{what}: {status} from the registry{detail}; are pull credentials needed?")
        if status in (429,) or status >= 500:
            raise RegistryUnavailable(f"{what}: the registry answered {status}{detail}")
        raise RegistryError(f"{what}: the registry answered {status}{detail}")

    def _authorize(self, host: str, scope: str, challenge: str, what: str) -> str:
        """The Authorization header the registry's challenge asks for (a fetched token is remembered)."""
        scheme, params = parse_challenge(challenge)
        creds = self._credentials(host)
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        if scheme == "basic":
            if basic is None:
                raise Unauthorized(f"{what}: the registry wants Basic credentials and none are configured for {host}")
            return basic
        if scheme != "bearer" or not params.get("realm"):
            raise Unauthorized(f"{what}: unsupported authentication challenge {challenge[:200]!r}")
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(query)
        status, _, body = self._send(url, "application/json", basic, 64 * 1024, f"token for {what}")
        if status != 200:
            err = RegistryUnavailable if status >= 500 else Unauthorized
            raise err(f"{what}: the token service at {params['realm']} answered {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unauthorized(f"{what}: the token service at {params['realm']} sent no token")
        self._tokens[(host, scope)] = f"Bearer {token}"
        return self._tokens[(host, scope)]

    def _send(
        self, url: str, accept: str, authorization: str | None, limit: int, what: str
    ) -> tuple[int, Message, bytes]:
        request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "beekeeper"})
        if authorization:
            request.add_header("Authorization", authorization)
        self.requests += 1
        try:
            response = self._opener.open(request, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers, exc.read(64 * 1024)
        except (urllib.error.URLError, OSError) as exc:
            cause = getattr(exc, "reason", exc)
            raise RegistryUnavailable(f"{what}: cannot reach {urllib.parse.urlsplit(url).netloc}: {cause}") from None
        with response:
            try:
                body = response.read(limit + 1)
            except OSError as exc:
                raise RegistryUnavailable(f"{what}: the download broke off: {exc}") from None
            if len(body) > limit:
                raise InvalidImage(f"{what}: larger than {limit} bytes")
            return response.status, response.headers, body
