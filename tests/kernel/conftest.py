"""Fixtures for tests that load real programs into the running kernel.

Every test gets its own bpffs base directory and state directory, so the backend under
test never sees pins of another test (or of a daemon on the machine). Network tests get
a fresh namespace joined to the host by a veth pair whose addresses lie in 10.222.0.0/16;
namespaces, interfaces, cgroups and pins are removed whatever the outcome.
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from beekeeper.node_daemon import bpf_syscalls as bpf
from beekeeper.node_daemon.capabilities import find_mount
from beekeeper.node_daemon.kernel_backend import KernelBackend

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests load BPF programs and need root")
        for item in items:
            if "kernel" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def bpffs_dir() -> Iterator[Path]:
    path = Path(f"/sys/fs/bpf/beekeeper-test-{secrets.token_hex(4)}")
    yield path
    _remove_pins(path)


def _remove_pins(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


@pytest.fixture
def backend(bpffs_dir: Path, tmp_path: Path) -> Iterator[KernelBackend]:
    """A backend on private directories; whatever a test leaves is removed afterwards."""
    be = KernelBackend(str(bpffs_dir), str(tmp_path / "state"))
    yield be
    for key in be.adopted():
        be.remove(key)
    be.close()


# --- network namespaces -------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class VethPair:
    """host_if lives in this (the daemon's) namespace, ns_if in the test namespace ns."""

    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def run(self, fn: Callable[[], T]) -> T:
        """Run fn on a thread inside the namespace; sockets it creates stay in the namespace."""
        result: dict[str, object] = {}

        def target() -> None:
            fd = os.open(f"/var/run/netns/{self.ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {self.ns}")
                result["value"] = fn()
            except BaseException as exc:  # re-raised on the calling thread
                result["error"] = exc
            finally:
                os.close(fd)

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]  # type: ignore[return-value]

    def socket(self, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        return self.run(lambda: socket.socket(socket.AF_INET, kind))

    def send_udp(self, port: int, count: int, pace_every: int = 20) -> int:
        """Send datagrams from the namespace to the host side, paced so no queue overflows."""
        with self.socket() as sock:
            for i in range(count):
                sock.sendto(b"beekeeper", (self.host_ip, port))
                if i % pace_every == pace_every - 1:
                    time.sleep(0.001)
        return count

    @contextmanager
    def udp_stream(self, port: int) -> Iterator[Callable[[], int]]:
        """Datagrams to port all along the block, from a thread; yields how many were sent so far
        (every one of them has been sent once the block is left)."""
        sent = 0
        stop = threading.Event()

        def run() -> None:
            nonlocal sent
            while not stop.is_set():
                sent += self.send_udp(port, 10, pace_every=10)

        sender = threading.Thread(target=run)
        sender.start()
        try:
            yield lambda: sent
        finally:
            stop.set()
            sender.join()


def _make_veth(stack: list[Callable[[], None]]) -> VethPair:
    tag = secrets.token_hex(3)
    third, fourth = random.randrange(256), random.randrange(0, 256, 4)
    pair = VethPair(
        f"bk-test-{tag}", f"bkh{tag}", f"bkn{tag}", f"10.222.{third}.{fourth + 1}", f"10.222.{third}.{fourth + 2}"
    )
    _ip("netns", "add", pair.ns)
    stack.append(lambda: subprocess.run(["ip", "netns", "del", pair.ns], check=False, capture_output=True))
    _ip("link", "add", pair.host_if, "type", "veth", "peer", "name", pair.ns_if, "netns", pair.ns)
    stack.append(lambda: subprocess.run(["ip", "link", "del", pair.host_if], check=False, capture_output=True))
    _ip("addr", "add", f"{pair.host_ip}/30", "dev", pair.host_if)
    _ip("link", "set", pair.host_if, "up")
    _ip("-n", pair.ns, "addr", "add", f"{pair.ns_ip}/30", "dev", pair.ns_if)
    _ip("-n", pair.ns, "link", "set", pair.ns_if, "up")
    _ip("-n", pair.ns, "link", "set", "lo", "up")
    return pair


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Undo actions, run last-in first-out after the test."""
    stack: list[Callable[[], None]] = []
    yield stack
    while stack:
        stack.pop()()


@pytest.fixture
def veth(cleanup: list[Callable[[], None]]) -> VethPair:
    return _make_veth(cleanup)


# --- cgroups ------------------------------------------------------------------------------


@pytest.fixture
def cgroup(cleanup: list[Callable[[], None]]) -> Path:
    root = find_mount("cgroup2")
    if root is None:
        pytest.skip("no cgroup v2 mount")
    path = Path(root) / f"bk-test-{secrets.token_hex(4)}"
    path.mkdir()
    cleanup.append(lambda: path.rmdir() if path.exists() else None)
    return path


# --- kernel object accounting -------------------------------------------------------------


class KernelObjects:
    """Kernel object ids, to prove that removal frees everything a unit created."""

    @staticmethod
    def pinned(base: Path) -> dict[str, set[int]]:
        """Ids of the programs, maps, links and BTF objects pinned (or referenced) under base."""
        ids: dict[str, set[int]] = {"prog": set(), "map": set(), "link": set(), "btf": set()}
        for path in base.rglob("*"):
            if path.is_dir():
                continue
            with bpf.obj_get(str(path)) as fd:
                if path.parent.name == "links":
                    ids["link"].add(bpf.link_info(fd.fd).id)
                elif path.parent.name == "maps":
                    info = bpf.map_info(fd.fd)
                    ids["map"].add(info.id)
                    ids["btf"].add(info.btf_id)
                else:
                    prog = bpf.prog_info(fd.fd)
                    ids["prog"].add(prog.id)
                    ids["btf"].add(prog.btf_id)
        ids["btf"].discard(0)
        return ids

    @staticmethod
    def still_alive(ids: dict[str, set[int]], timeout: float = 3.0) -> dict[str, set[int]]:
        """The ids still alive after waiting (the kernel frees objects after an RCU grace period)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = {kind: wanted & set(bpf.object_ids(kind)) for kind, wanted in ids.items()}
            if not any(alive.values()) or time.monotonic() > deadline:
                return {k: v for k, v in alive.items() if v}
            time.sleep(0.05)


@pytest.fixture
def kernel_objects() -> type[KernelObjects]:
    return KernelObjects
