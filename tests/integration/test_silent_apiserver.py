"""A connection to the apiserver that goes silent (a partition, a vanished load balancer) ends in a bounded
time: writes fail and are retried by their callers, and the daemon's watch lists again, instead of one
thread blocking for good (a node writer wedging the operator's pass, a daemon never seeing a new spec).

The peer here accepts connections and then never answers; nothing else is needed of an apiserver.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from beekeeper import kube
from beekeeper.node_daemon import list_watch as lw


def kubeconfig(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A port that accepts connections and reads requests but never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def outcome_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What call() raised, run on a thread of its own; fails the test when it is still blocked after seconds."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:  # the outcome under test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"still blocked after {seconds:.0f} s: the request has no timeout"
    return raised[0]


def test_a_write_to_a_silent_apiserver_fails_within_the_request_timeout(
    tmp_path: Path, silent_peer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (1.0, 1.0))
    api = kube.api_client(kubeconfig(tmp_path, silent_peer))
    path = "/apis/beekeeper.dev/v1alpha1/bpfnodestates/n1"
    write = outcome_within(10, lambda: kube.request_json(api, "PATCH", path, {}, None, kube.MERGE_PATCH))
    read = outcome_within(10, lambda: client.CoreV1Api(api).read_namespace("default"))  # the generated client's
    for exc in (write, read):
        assert exc is not None and "timed out" in str(exc).lower(), exc


class _ListsThenHangs(BaseHTTPRequestHandler):
    """Lists answer at once (no items); a watch gets its headers and then silence."""

    lists = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if "watch=" in self.path:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            time.sleep(30)
            return
        type(self).lists += 1
        body = json.dumps({"kind": "List", "items": [], "metadata": {"resourceVersion": "7"}}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_daemon_watch_gone_silent_lists_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lw, "WATCH_READ_SECONDS", 1.0)
    monkeypatch.setattr(lw, "RETRY_SECONDS", 0.1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ListsThenHangs)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    listings: list[float] = []
    api = client.CustomObjectsApi(kube.api_client(kubeconfig(tmp_path, server.server_address[1])))
    args = (api, "bpfnodestates", "metadata.name=n1", lambda items: listings.append(time.monotonic()))
    watcher = threading.Thread(target=lw.list_watch, args=(*args, lambda *_: None, stop, "watch", "n1"), daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 15
        while len(listings) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(listings) >= 3, f"listed {len(listings)} times in 15 s: the silent watch was not given up"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
