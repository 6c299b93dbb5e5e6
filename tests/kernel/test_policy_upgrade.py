"""Upgrading a node from the bcc-built policy datapath to the clang-built (CO-RE) one, under traffic.

The previous release compiled bpf/policy.c with bcc on the node. fixtures/policy_bcc.c is
that source, byte for byte (bpf/policy.c at f62fa45, the last commit before the move), and
load_bcc_release() does what that release's daemon did with it: compile with the pin
directory as a macro, pin both programs under progs/<hash of source and flags>, fill the
maps (bcc pinned them itself, from BPF_TABLE_PINNED) and attach tcx links at the head of
each veth's chains, pinned under links/. A fixture instead of `git show` of an old commit:
the test then needs no git history (shallow clones, sdists) and says exactly what it
upgrades from.

Then today's PolicyDatapath adopts that directory while probes between real pods run on
threads: it must reuse every map with its content (same map ids, a no-op first sync),
swap the programs in place on the existing links (same link ids, new program ids), keep
an established TCP connection alive, and change no verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from netpol_rig import PodRig, Probe, Prober, TruthTable, probe, tcx_program_ids
from support import BPFFS_TEST_ROOT, pinned_ids, sockets_in, wait_for

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon import policy_maps as pm
from beekeeper.node_daemon.bcc_compile import CompiledModule
from beekeeper.node_daemon.policy_datapath import FROM_POD, TO_POD, PolicyDatapath
from beekeeper.node_daemon.policy_maps import Action, DatapathState, Direction, Endpoint, PrefixIdentity, Rule
from beekeeper.node_daemon.policy_syscalls import map_update, tcx_link_create_first

pytestmark = pytest.mark.kernel

BCC_RELEASE = Path(__file__).parent / "fixtures" / "policy_bcc.c"
RELEASE_HOOKS = {FROM_POD: (bpf.ATTACH_TCX_INGRESS, "from_pod"), TO_POD: (bpf.ATTACH_TCX_EGRESS, "to_pod")}
"""The previous release's programs, tcx hooks and link pin suffixes."""

IDENTITIES = {"u/server": 1000, "u/client": 1001, "u/other": 1002}
LONG_LIVED_PORT = 8080
TCP, UDP = 6, 17


def load_bcc_release(path: Path, state: DatapathState, ifnames: list[str]) -> dict[str, int]:
    """The previous release's datapath, loaded, synced and attached as its daemon left it; program ids."""
    maps_dir, links_dir = path / "maps", path / "links"
    maps_dir.mkdir(parents=True)
    links_dir.mkdir()
    source = BCC_RELEASE.read_text()
    cflags = [f'-DBK_PIN_DIR="{maps_dir}"']
    progs_dir = path / "progs" / hashlib.sha256("\0".join([source, *cflags]).encode()).hexdigest()[:12]
    progs_dir.mkdir(parents=True)
    with CompiledModule(source, cflags) as module:
        progs = {p: module.load(p, bpf.PROG_TYPE_SCHED_CLS) for p in RELEASE_HOOKS}
    try:
        for name, fd in progs.items():
            bpf.obj_pin(fd.fd, str(progs_dir / name))
        encoded = pm.encode(state, lambda interface: socket.if_nametoindex(str(interface)))
        for spec in pm.SYNCED_MAPS:
            with bpf.obj_get(str(maps_dir / spec.name)) as fd:
                for key, value in encoded.maps[spec.name].items():
                    map_update(fd.fd, key, value)
        with bpf.obj_get(str(maps_dir / pm.POLICY_EPOCH.name)) as fd:
            map_update(fd.fd, pm.EPOCH_KEY.pack(0), pm.EPOCH_KEY.pack(1))
        for ifname in ifnames:
            ifindex = socket.if_nametoindex(ifname)
            for prog, (attach_type, suffix) in RELEASE_HOOKS.items():
                with tcx_link_create_first(progs[prog].fd, ifindex, attach_type) as link:
                    bpf.obj_pin(link.fd, str(links_dir / f"{ifindex}_{suffix}"))
        return {p: bpf.prog_info(fd.fd).id for p, fd in progs.items()}
    finally:
        for fd in progs.values():
            fd.close()


def desired(rig: PodRig, other_may_reach_server: bool = False) -> DatapathState:
    """server admits client on TCP 80/81 (81 through an any-peer allow that a deny rule takes from other),
    UDP 81 and the long-lived port; other may send only on TCP 81 (to client, and to server, which denies it)."""
    server, other = IDENTITIES["u/server"], IDENTITIES["u/other"]
    client = IDENTITIES["u/client"]
    rules = [
        Rule(server, Direction.INGRESS, client, TCP, 80, 80, Action.ALLOW, 1),
        Rule(server, Direction.INGRESS, client, UDP, 81, 81, Action.ALLOW, 1),
        Rule(server, Direction.INGRESS, client, TCP, LONG_LIVED_PORT, LONG_LIVED_PORT, Action.ALLOW, 1),
        Rule(server, Direction.INGRESS, pm.ID_ANY, TCP, 81, 81, Action.ALLOW, 2),
        Rule(server, Direction.INGRESS, other, TCP, 81, 81, Action.DENY, 3),
        Rule(other, Direction.EGRESS, client, TCP, 81, 81, Action.ALLOW, 4),
        Rule(other, Direction.EGRESS, server, TCP, 81, 81, Action.ALLOW, 4),  # then denied by server's rule 3
    ]
    if other_may_reach_server:
        rules += [
            Rule(server, Direction.INGRESS, other, TCP, 80, 80, Action.ALLOW, 5),
            Rule(other, Direction.EGRESS, server, TCP, 80, 80, Action.ALLOW, 5),
        ]
    return DatapathState(
        endpoints=[
            Endpoint(pod.host_if, pod.ip, IDENTITIES[key], key == "u/server", key == "u/other")
            for key, pod in rig.pods.items()
        ],
        ipcache=[PrefixIdentity(f"{pod.ip}/32", IDENTITIES[key]) for key, pod in rig.pods.items()],
        rules=rules,
        policy_names={1: "u/client", 2: "u/any-81", 3: "u/deny-other", 4: "u/other-egress", 5: "u/other-80"},
    )


def expected_table(keys: list[str], other_may_reach_server: bool = False) -> dict[Probe, bool]:
    table = TruthTable.full(keys)
    table.set(False, to="u/server").set(False, frm="u/other")
    table.set(True, frm="u/client", to="u/server", port=80, protocol="TCP")
    table.set(True, frm="u/client", to="u/server", port=81)
    table.set(True, frm="u/other", to="u/client", port=81, protocol="TCP")
    if other_may_reach_server:
        table.set(True, frm="u/other", to="u/server", port=80, protocol="TCP")
    return {p: allowed for p, allowed in table.cells.items() if p.src != p.dst}  # self: loopback, no veth


@pytest.fixture
def rig() -> Iterator[PodRig]:
    with PodRig(None) as rig:
        for key in IDENTITIES:
            rig.add(key, "u", key.split("/")[1], "node", {})
        rig.wait_servers()
        yield rig


def exchange(a: socket.socket, b: socket.socket, data: bytes) -> None:
    a.sendall(data)
    assert b.recv(len(data)) == data


def test_bcc_release_upgrades_to_core_without_a_wrong_verdict(rig: PodRig) -> None:
    path = BPFFS_TEST_ROOT / f"policy-upgrade-{uuid.uuid4().hex[:8]}"
    pods = rig.pods
    veths = [pod.host_if for pod in pods.values()]
    dp: PolicyDatapath | None = None
    probers: list[Prober] = []
    threads: list[threading.Thread] = []
    sockets = contextlib.ExitStack()
    try:
        try:
            old_progs = load_bcc_release(path, desired(rig), veths)
            assert {hooks["ingress"][0] for hooks in map(tcx_program_ids, veths)} == {old_progs[FROM_POD]}
            expected = expected_table(list(pods))
            assert probe(pods, expected, 1.0) == expected, "the bcc-built release enforces the policy"

            listener = sockets.enter_context(sockets_in(pods["u/server"].netns, [socket.SOCK_STREAM])[0])
            listener.bind((pods["u/server"].ip, LONG_LIVED_PORT))
            listener.listen()
            client = sockets.enter_context(sockets_in(pods["u/client"].netns, [socket.SOCK_STREAM])[0])
            client.settimeout(2)
            client.connect((pods["u/server"].ip, LONG_LIVED_PORT))
            conn = sockets.enter_context(listener.accept()[0])
            conn.settimeout(2)
            exchange(client, conn, b"before")

            maps, links = pinned_ids(path / "maps", bpf.map_info), pinned_ids(path / "links", bpf.link_info)
            # Allowed flows answer at once, so their prober runs many rounds; denied ones each wait out the timeout.
            probers = [Prober(pods, {p: v for p, v in expected.items() if v is verdict}) for verdict in (True, False)]
            threads = [threading.Thread(target=p.run, daemon=True) for p in probers]
            for thread in threads:
                thread.start()
            for p in probers:
                p.rounds_after(2)

            dp = PolicyDatapath(path)  # the new daemon starts
            new_progs = dp.prog_ids
            assert set(new_progs.values()).isdisjoint(old_progs.values())
            pinned = pinned_ids(path / "maps", bpf.map_info)
            assert {name: pinned[name] for name in maps} == maps  # reused, not recreated
            assert set(pinned) - set(maps) == {pm.DROP_LIMITS.name}  # what the release did not have is created
            assert pinned_ids(path / "links", bpf.link_info) == links  # the same links now run the new programs
            for veth in veths:
                assert tcx_program_ids(veth) == {"ingress": [new_progs[FROM_POD]], "egress": [new_progs[TO_POD]]}
            assert [p.name for p in (path / "progs").iterdir()] == [dp.build_id]
            # What the new daemon then does: sync the same desired state (nothing to write) and attach (no-op).
            synced = dp.sync(desired(rig))
            assert (synced.updates, synced.deletes, synced.epoch) == (0, 0, 1), "the maps kept their content"
            assert {veth: dp.attach(veth).link_ids for veth in veths} == {
                veth: {p: links[f"{socket.if_nametoindex(veth)}_{s}"] for p, (_, s) in RELEASE_HOOKS.items()}
                for veth in veths
            }
            exchange(client, conn, b"during")  # conntrack's entry was judged by the old programs
            for p in probers:
                p.rounds_after(3)
        finally:
            for p in probers:
                p.stop.set()
            for thread in threads:
                thread.join(timeout=30)
        wrong = [w for p in probers for w in p.wrong]
        connections = sum(p.connections for p in probers)
        assert not wrong, f"{len(wrong)} wrong verdicts of {connections}, first: {wrong[:5]}"
        exchange(conn, client, b"after")
        assert dp is not None
        drops = list(dp.drops(timeout=1))  # the ring buffer of the old release, still the one programs write
        assert any(d.policy == "u/deny-other" for d in drops), drops[:5]
        wait_for(
            lambda: not set(bpf.object_ids("prog")) & set(old_progs.values()),
            timeout=10,
            what="the bcc-built programs to be freed",
        )

        # The new datapath serves policy changes on the maps it inherited.
        changed = expected_table(list(pods), other_may_reach_server=True)
        dp.sync(desired(rig, other_may_reach_server=True))
        assert probe(pods, changed, 1.0) == changed
        print(
            f"\nbcc -> CO-RE upgrade under traffic: {connections} connections "
            f"({probers[0].connections} allowed), 0 wrong verdicts; maps {sorted(maps.values())} reused, "
            f"programs {old_progs} -> {new_progs} on {len(links)} links"
        )
    finally:
        sockets.close()
        if dp is not None:
            dp.remove()
        else:
            for pin in (path / "links").glob("*"):
                pin.unlink()
        shutil.rmtree(path, ignore_errors=True)
