"""Drop explanations: the log, its HTTP endpoint and the `beekeeper why-dropped` command."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from beekeeper import cli
from beekeeper.devenv import processes
from beekeeper.node_daemon import http_api
from beekeeper.node_daemon.access import Permission, User
from beekeeper.node_daemon.drops import DropLog, DropRecord, explain
from beekeeper.node_daemon.policy_maps import Direction, DropEvent, DropReason

DEFAULT_DENY = DropEvent(
    timestamp_ns=0,
    ifindex=12,
    direction=Direction.INGRESS,
    saddr="10.240.0.6",
    daddr="10.240.0.2",
    sport=40000,
    dport=80,
    protocol=6,
    local_identity=300,
    peer_identity=301,
    peer_cidr_identity=0,
    reason=DropReason.DEFAULT_DENY,
    policy_index=None,
    policy=None,
    revoked=False,
)
DENY_RULE = replace(
    DEFAULT_DENY, protocol=17, dport=81, reason=DropReason.DENY_RULE, policy_index=4, policy="x/no-udp", revoked=True
)


def test_explanations_name_the_decider_the_direction_and_the_peer() -> None:
    assert explain(DEFAULT_DENY, "x/a") == (
        "default deny: pod x/a is isolated for ingress and no policy allows identity 301 on TCP/80"
    )
    assert explain(DENY_RULE, None) == (
        "denied by x/no-udp: a deny rule matches this flow into the pod on interface 12 (deny rules win over "
        "allows); the flow was established, then revoked by a policy change"
    )
    spoofed = replace(DEFAULT_DENY, direction=Direction.EGRESS, reason=DropReason.SPOOFED_SOURCE)
    assert explain(spoofed, "x/a") == "the source address is not the IP of pod x/a"


def test_query_groups_repeated_drops_of_a_flow_newest_first() -> None:
    log = DropLog(capacity=3)
    for i, event in enumerate([DEFAULT_DENY, DEFAULT_DENY, replace(DEFAULT_DENY, sport=40001), DENY_RULE]):
        log.add(DropRecord(1_700_000_000 + i, event, "x/a"))  # capacity 3: the first is gone
    newest, older = log.query()
    assert newest["reason"] == "DenyRule" and newest["policy"] == "x/no-udp" and newest["count"] == 1
    assert older["reason"] == "DefaultDeny" and older["count"] == 2, "source ports do not split a flow"
    assert older["firstSeen"] == "2023-11-14T22:13:21.000Z" and older["lastSeen"] == "2023-11-14T22:13:22.000Z"
    assert log.query(protocol=17) == [newest]
    assert log.query(src="10.240.0.6", dst="10.240.0.2", port=80) == [older]
    assert log.query(src="10.240.0.99") == []
    assert log.query(limit=1) == [newest]


class OneToken:
    """Stands in for the API's reviews (the real ones are tests/integration/test_daemon_access.py):
    TOKEN is user "reader", who may do everything."""

    def authenticate(self, token: str) -> User | None:
        return User("reader") if token == TOKEN else None

    def authorize(self, user: User, permission: Permission) -> tuple[bool, str]:
        return True, ""


TOKEN = "t0ken"


@pytest.fixture
def daemon_url() -> Iterator[str]:
    log = DropLog()
    log.add(DropRecord(time.time(), DEFAULT_DENY, "x/a"))
    port = processes.free_port()
    server = http_api.serve(CollectorRegistry(), log, "node-1", port, "127.0.0.1", OneToken())  # type: ignore[arg-type]
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def test_why_dropped_command_explains_a_drop(
    daemon_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.logs, "setup", lambda *_: None)  # keep the session's logging as it is
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")
    assert cli.main(["why-dropped", "--url", daemon_url, "--src", "10.240.0.6"]) == 1
    assert "401 authentication required" in capsys.readouterr().err
    argv = ["why-dropped", "--url", daemon_url, "--token", TOKEN]
    assert cli.main([*argv, "--src", "10.240.0.6", "--port", "80"]) == 0
    out = capsys.readouterr().out
    assert "10.240.0.6 -> 10.240.0.2 TCP/80: dropped 1 packet at ingress of x/a on node node-1" in out
    assert "why: default deny: pod x/a is isolated for ingress" in out

    assert cli.main([*argv, "--dst", "10.240.0.9", "--protocol", "udp"]) == 0
    assert capsys.readouterr().out.strip() == (
        "no recorded drops match dst=10.240.0.9 protocol=UDP (node-1 keeps its last 8192 drop events)"
    )

    assert cli.main([*argv, "--src", "not-an-ip"]) == 1
    assert "src: 'not-an-ip' is not an IPv4 address" in capsys.readouterr().err


def test_metrics_are_served_next_to_drops(daemon_url: str) -> None:
    request = urllib.request.Request(f"{daemon_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{daemon_url}/healthz", timeout=5) as resp:
        assert resp.status == 200, "probes need no credentials"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{daemon_url}/nope", timeout=5)
    assert err.value.code == 404
