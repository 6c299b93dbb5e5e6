"""Who may read the node daemon's HTTP endpoints: authentication and authorization through the API.

As the kubelet and controller-runtime's metrics filter do: a bearer token is authenticated
with a TokenReview, a client certificate (over TLS, when the daemon has --client-ca-file)
by the cluster's client CA, and the user is authorized with a SubjectAccessReview on an
attribute a cluster admin grants with RBAC:

    /metrics   get on the non-resource URL /metrics (what Prometheus' ClusterRoles already grant)
    /drops     get on bpfnodestates/drops named after this node (resourceNames can limit it to
               some nodes; namespace-scoped Roles cannot grant it: BpfNodeState is cluster-scoped)

Review results are cached briefly (allowed for 60 s, denied for 10 s), so a scrape every
15 s costs the API one review pair a minute, and a revoked grant stops working within a
minute. API errors are not cached: the request is answered 503 and the next one retries.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

_API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
"""A refusal, or no answer (apiserver down, connection reset, timeout)."""

ALLOWED_TTL = 60.0
DENIED_TTL = 10.0
MAX_CACHED = 4096
REVIEW_TIMEOUT = 5.0


@dataclass(frozen=True)
class User:
    """An authenticated caller, as the API knows it."""

    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Permission:
    """What a request needs: a verb on a non-resource path, or on a (sub)resource of a named object."""

    verb: str
    path: str | None = None
    group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""

    def attributes(self) -> dict[str, Any]:
        """The SubjectAccessReview spec fields for this permission."""
        if self.path is not None:
            return {"nonResourceAttributes": {"path": self.path, "verb": self.verb}}
        resource = {"group": self.group, "resource": self.resource, "verb": self.verb, "name": self.name}
        if self.subresource:
            resource["subresource"] = self.subresource
        return {"resourceAttributes": resource}

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.verb} {self.path}"
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {what}.{self.group} {self.name!r}" if self.group else f"{self.verb} {what} {self.name!r}"


class ReviewUnavailable(RuntimeError):
    """The API could not answer a review; nothing is cached, the caller gets 503."""


class TtlCache:
    """Review results by key, kept `ttl(value)` seconds; the oldest entries go first when full."""

    def __init__(
        self, ttl: Callable[[Any], float], max_entries: int = MAX_CACHED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._items: dict[Hashable, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        value = compute()  # outside the lock: one slow review must not hold up the others
        with self._lock:
            self._items.pop(key, None)
            if len(self._items) >= self._max:
                del self._items[next(iter(self._items))]
            self._items[key] = (now + self._ttl(value), value)
        return value


class ApiAccess:
    """TokenReview + SubjectAccessReview against the cluster's API, cached briefly."""

    def __init__(self, api: client.ApiClient, clock: Callable[[], float] = time.monotonic) -> None:
        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)
        self._tokens = TtlCache(lambda user: ALLOWED_TTL if user else DENIED_TTL, clock=clock)
        self._decisions = TtlCache(lambda decision: ALLOWED_TTL if decision[0] else DENIED_TTL, clock=clock)

    def authenticate(self, token: str) -> User | None:
        """The token's user, or None when the API does not accept the token."""
        return self._tokens.get(hashlib.sha256(token.encode()).digest(), lambda: self._review_token(token))

    def authorize(self, user: User, permission: Permission) -> tuple[bool, str]:
        """(allowed, the authorizer's reason) for `user` to do `permission`."""
        return self._decisions.get((user, permission), lambda: self._review_access(user, permission))

    def _review_token(self, token: str) -> User | None:
        try:
            review = self._authn.create_token_review(
                {"spec": {"token": token}},  # type: ignore[arg-type]  # the client sends a dict body as it is
                _request_timeout=REVIEW_TIMEOUT,
            )
        except _API_ERRORS as exc:
            raise ReviewUnavailable(f"TokenReview failed: {getattr(exc, 'reason', None) or exc}") from None
        status = review.status
        if not status or not status.authenticated or not status.user:
            return None
        extra = tuple(sorted((k, tuple(v)) for k, v in (status.user.extra or {}).items()))
        return User(status.user.username or "", tuple(status.user.groups or ()), status.user.uid or "", extra)

    def _review_access(self, user: User, permission: Permission) -> tuple[bool, str]:
        spec: dict[str, Any] = {"user": user.name, "groups": list(user.groups), **permission.attributes()}
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {k: list(v) for k, v in user.extra}
        try:
            review = self._authz.create_subject_access_review(
                {"spec": spec},  # type: ignore[arg-type]  # the client sends a dict body as it is
                _request_timeout=REVIEW_TIMEOUT,
            )
        except _API_ERRORS as exc:
            raise ReviewUnavailable(f"SubjectAccessReview failed: {getattr(exc, 'reason', None) or exc}") from None
        status = review.status
        return bool(status and status.allowed), (status.reason or "") if status else ""


def certificate_user(peer_cert: dict[str, Any]) -> User | None:
    """The user of a verified client certificate, as the apiserver reads it: CN the name, O the groups."""
    names = [(key, value) for rdn in peer_cert.get("subject", ()) for key, value in rdn]
    common = [v for k, v in names if k == "commonName"]
    if not common:
        return None
    return User(common[0], tuple(v for k, v in names if k == "organizationName"))
