"""Helpers shared by the integration and kernel tests (importable: tests/ is on pythonpath)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from beekeeper.devenv import processes


def wait_for(check, timeout: float = 60.0, what: str = "condition", interval: float = 0.2):
    """Poll `check()` until it returns something truthy; fail with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


@dataclass
class Process:
    """A beekeeper component started by the tests (a real process)."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    pid: int | None = None

    def start(self) -> Process:
        self.pid = processes.spawn(self.argv, self.log, self.env)
        return self

    def stop(self) -> None:
        processes.stop(self.pid)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL, like a crash or an OOM kill: no cleanup code runs."""
        if self.pid and processes.alive(self.pid):
            os.killpg(self.pid, signal.SIGKILL)
            processes.wait_until(lambda: not processes.alive(self.pid), f"{self.name} killed", 10)
        self.pid = None

    def alive(self) -> bool:
        return processes.alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@dataclass
class NodeDaemon(Process):
    """A simulated node: a Node object plus a node daemon process with its own pins and port."""

    node: str = ""
    test_labels: dict[str, str] = field(default_factory=dict)
    """Labels every Node of the same test carries (to select only this test's nodes)."""
    metrics_port: int = 0
    bpffs_root: Path = Path()
    state_dir: Path = Path()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()


def sh(*argv: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (optionally inside a network namespace); errors show the command and stderr."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    result = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass
class VethNamespace:
    """A network namespace wired to the host by a veth pair, the way a CNI plugin wires a pod.

    Host side `host_if` (no address), namespace side `eth0` with `ip`/24 and a host route to
    `ip` via `host_if`; the host side gets `host_ip` so the namespace can reach the host.
    """

    name: str
    host_if: str
    ip: str
    host_ip: str

    def create(self) -> VethNamespace:
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/32", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "link", "set", "lo", "up", netns=self.name)
        sh("ip", "addr", "add", f"{self.ip}/32", "dev", "eth0", netns=self.name)
        sh("ip", "link", "set", "eth0", "up", netns=self.name)
        sh("ip", "route", "add", f"{self.host_ip}/32", "dev", "eth0", netns=self.name)
        sh("ip", "route", "add", "default", "via", self.host_ip, "dev", "eth0", netns=self.name)
        sh("ip", "route", "replace", f"{self.ip}/32", "dev", self.host_if)
        return self

    def delete(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*argv, check=check, netns=self.name)
