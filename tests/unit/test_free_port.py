"""free_port hands out ports no outgoing connection can take meanwhile, each once."""

from __future__ import annotations

import socket

from beekeeper.devenv import processes


def test_ports_come_from_below_the_ephemeral_range_and_once_each() -> None:
    low = processes._ephemeral_low()
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    with socket.socket() as sock:  # what the caller then does with one
        sock.bind(("127.0.0.1", ports[-1]))
