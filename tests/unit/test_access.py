"""The node daemon's access checks: review caching and identities (the reviews themselves: integration)."""

from __future__ import annotations

from beekeeper.node_daemon.access import ALLOWED_TTL, DENIED_TTL, Permission, TtlCache, User, certificate_user
from beekeeper.node_daemon.http_api import METRICS_PERMISSION, drops_permission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reviews_are_cached_briefly_and_denials_more_briefly() -> None:
    clock, calls = Clock(), []
    cache = TtlCache(lambda allowed: ALLOWED_TTL if allowed else DENIED_TTL, clock=clock)

    def review(key: str, answer: bool):
        return cache.get(key, lambda: calls.append(key) or answer)

    assert review("yes", True) and review("yes", True) and calls == ["yes"]
    assert not review("no", False) and not review("no", False) and calls == ["yes", "no"]
    clock.now = DENIED_TTL + 1
    assert review("yes", True) and calls == ["yes", "no"], "an allowed answer lasts longer"
    assert review("no", True) and calls == ["yes", "no", "no"], "a denial is asked again soon (a grant was added)"
    clock.now = ALLOWED_TTL + 1
    assert review("yes", False) is False and calls[-1] == "yes", "a revoked grant stops working within a minute"


def test_cache_is_bounded() -> None:
    cache = TtlCache(lambda _: 60.0, max_entries=2, clock=Clock())
    for key in "abc":
        cache.get(key, lambda: True)
    asked = []
    cache.get("a", lambda: asked.append("a") or True)
    assert asked == ["a"], "the oldest entry made room"


def test_client_certificate_identity_is_read_as_the_apiserver_does() -> None:
    cert = {"subject": ((("commonName", "jane"),), (("organizationName", "ops"),), (("organizationName", "dev"),))}
    assert certificate_user(cert) == User("jane", ("ops", "dev"))
    assert certificate_user({"subject": ((("organizationName", "ops"),),)}) is None


def test_permissions_are_subject_access_review_attributes() -> None:
    assert METRICS_PERMISSION.attributes() == {"nonResourceAttributes": {"path": "/metrics", "verb": "get"}}
    assert drops_permission("n1").attributes() == {
        "resourceAttributes": {
            "group": "beekeeper.dev",
            "resource": "bpfnodestates",
            "subresource": "drops",
            "name": "n1",
            "verb": "get",
        }
    }
    assert str(drops_permission("n1")) == "get bpfnodestates/drops.beekeeper.dev 'n1'"
    assert str(Permission("get", path="/metrics")) == "get /metrics"
