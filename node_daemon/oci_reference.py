"""OCI image references (`registry/repository[:tag][@sha256:...]`): parsed, validated, printed.

One parser for the operator (which resolves tags and checks signatures) and the node daemon
(which pulls by digest), so both read a reference the same way and an error names the part
that is wrong. The grammar is Docker's distribution reference, as containerd, podman, skopeo
and bpfman read it: a first component with a dot, a colon or `localhost` is the registry,
otherwise the image is on Docker Hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
"""Where Docker Hub's distribution API answers (docker.io itself only redirects)."""

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_REGISTRY = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::\d{1,5})?$"
)

MAX_REFERENCE = 512


class BadReference(ValueError):
    """The string is not an OCI image reference; the message says which part is wrong."""


@dataclass(frozen=True)
class ImageReference:
    registry: str
    """Host[:port] as written (docker.io for Docker Hub)."""
    repository: str
    """Path within the registry, e.g. bpfman-bytecode/xdp_pass (library/ added for Docker Hub)."""
    tag: str | None = None
    digest: str | None = None
    """sha256:<64 hex>: pins the exact manifest; a tag beside it is informational."""

    @property
    def api_host(self) -> str:
        """Host[:port] the distribution API is served on."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest (cosign's docker-reference)."""
        return f"{self.registry}/{self.repository}"

    def pinned(self, digest: str) -> ImageReference:
        """The same image pinned to digest (the tag is kept for people reading it)."""
        return ImageReference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse(text: str) -> ImageReference:
    """Parse a reference; without tag and digest the tag is `latest`, as every OCI client reads it."""
    if not text or len(text) > MAX_REFERENCE:
        raise BadReference(f"image reference must be 1 to {MAX_REFERENCE} characters")
    if text != text.strip() or any(c.isspace() for c in text):
        raise BadReference(f"image reference {text!r} contains whitespace")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise BadReference(f"digest {digest!r} of {text!r} is not sha256: followed by 64 lowercase hex digits")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise BadReference(f"tag {tag!r} of {text!r} is not a valid tag ([A-Za-z0-9_.-], at most 128)")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repository = first, remainder
        if not _REGISTRY.match(registry):
            raise BadReference(f"registry {registry!r} of {text!r} is not a host name or address with a port")
    else:
        registry, repository = DOCKER_HUB, rest
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise BadReference(
            f"repository {repository!r} of {text!r} must be lowercase path components of [a-z0-9] separated by . _ -"
        )
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry, repository, tag, digest)
