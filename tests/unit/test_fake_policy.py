"""The in-memory policy datapath of fake nodes: the write plan of the kernel's, applied to dicts."""

from __future__ import annotations

from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.fake_policy import FakePolicyDatapath, FakeRoutes
from beekeeper.node_daemon.routes import PodInterface, Unresolved


def _desired(**entries: dict[bytes, bytes]) -> dict[str, dict[bytes, bytes]]:
    return {spec.name: dict(entries.get(spec.name, {})) for spec in pm.SYNCED_MAPS}


def test_apply_writes_only_what_differs_and_moves_the_epoch(tmp_path) -> None:
    datapath = FakePolicyDatapath(tmp_path)
    name = pm.SYNCED_MAPS[0].name
    first = datapath.apply(_desired(**{name: {b"a": b"1", b"b": b"2"}}), None, {}, None)
    assert (first.updates, first.deletes, first.epoch) == (2, 0, 1)
    second = datapath.apply(
        _desired(**{name: {b"a": b"1", b"b": b"3"}}),
        {spec.name: [b"b"] if spec.name == name else [] for spec in pm.SYNCED_MAPS},
        {},
        None,
    )
    assert (second.updates, second.deletes, second.epoch) == (1, 0, 2)
    third = datapath.apply(_desired(**{name: {b"a": b"1"}}), None, {}, None)
    assert (third.updates, third.deletes) == (0, 1) and datapath.maps[name] == {b"a": b"1"}
    assert datapath.apply(_desired(**{name: {b"a": b"1"}}), None, {}, None).epoch == 3  # nothing written


def test_links_and_routes(tmp_path) -> None:
    routes = FakeRoutes()
    interface = routes.pod_interface("10.0.0.7")
    assert isinstance(interface, PodInterface) and routes.pod_interface("10.0.0.7") == interface
    assert isinstance(routes.pod_interface("fd00::7"), Unresolved)
    datapath = FakePolicyDatapath(tmp_path)
    datapath.attach(interface.ifindex)
    assert set(datapath.attached()) == {interface.ifname}
    assert datapath.detach(interface.ifname) and not datapath.detach(interface.ifindex)
    assert datapath.attached() == {}
