"""Finding a pod's host-side interface from the kernel's route to its IP (rtnetlink, no `ip` parsing)."""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator

import pytest

from beekeeper.node_daemon.routes import PodInterface, RouteTable, RouteWatcher, Unresolved

pytestmark = pytest.mark.kernel


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def links() -> Iterator[str]:
    """A tag for link names; every link named bkr<tag>* is deleted afterwards."""
    tag = uuid.uuid4().hex[:5]
    yield tag
    for suffix in ("v", "d", "p"):
        subprocess.run(["ip", "link", "del", f"bkr{tag}{suffix}"], capture_output=True)


def test_pod_interface_is_the_veth_the_host_route_points_to(links: str) -> None:
    veth, bridge = f"bkr{links}v", f"bkr{links}d"
    _ip("link", "add", veth, "type", "veth", "peer", "name", f"bkr{links}p")
    _ip("link", "add", bridge, "type", "bridge")
    for name in (veth, bridge):
        _ip("link", "set", name, "up")
    _ip("route", "add", "10.240.250.2/32", "dev", veth)
    _ip("route", "add", "10.240.250.8/29", "dev", bridge)
    _ip("route", "add", "10.240.250.32/27", "via", "10.240.250.2", "dev", veth)
    _ip("route", "add", "blackhole", "10.240.250.64/27")
    try:
        with RouteTable() as routes:
            assert routes.pod_interface("10.240.250.2") == PodInterface(socket.if_nametoindex(veth), veth)
            assert routes.pod_interface("10.240.250.9") == Unresolved(
                f"routed out of {bridge}, a bridge device, not a pod's veth"
            )
            assert routes.pod_interface("10.240.250.33") == Unresolved(
                "routed through a gateway (not a pod on this node)"
            )
            assert routes.pod_interface("10.240.250.65") == Unresolved("routed as blackholed")
            assert routes.pod_interface("127.0.0.1") == Unresolved("routed as a local address")
    finally:
        _ip("route", "del", "blackhole", "10.240.250.64/27")


def test_watcher_wakes_on_route_changes(links: str) -> None:
    woke = threading.Event()
    watcher = RouteWatcher(woke.set)
    try:
        _ip("link", "add", f"bkr{links}d", "type", "bridge")
        assert woke.wait(5), "no wake-up after a link was added"
    finally:
        watcher.close()
