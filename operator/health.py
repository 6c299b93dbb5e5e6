"""The operator's probes: GET /healthz (liveness) and GET /readyz (readiness), as JSON; and GET /metrics.

/healthz is 200 while the reconcile loop runs and makes progress: 503 once the loop task
has ended, or when no pass has completed for longer than STUCK_FACTOR resync periods (a
healthy loop completes one at least every period, idle or not), e.g. every pass failing
or one hung. /readyz is 200 once the cache was primed and the first pass completed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

STUCK_FACTOR = 3


@dataclass
class Health:
    """What the loop reports about itself; read by the probe server's threads."""

    resync_seconds: float
    started: float = field(default_factory=time.monotonic)
    loop_running: bool = False
    primed: bool = False
    passes: int = 0
    """Passes completed."""
    failures: int = 0
    consecutive_failures: int = 0
    restarts: int = 0
    """Times the loop itself was restarted after an unexpected error."""
    last_error: str | None = None
    last_pass_end: float | None = None
    pass_started: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def pass_began(self) -> None:
        self.update(pass_started=time.monotonic())

    def pass_done(self) -> None:
        with self._lock:
            self.passes += 1
            self.consecutive_failures = 0
            self.last_pass_end = time.monotonic()
            self.pass_started = None

    def pass_failed(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = error[:1024]
            self.pass_started = None

    def live(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(healthy, the report); pure given the fields."""
        now = time.monotonic() if now is None else now
        with self._lock:
            since = now - (self.last_pass_end if self.last_pass_end is not None else self.started)
            bound = STUCK_FACTOR * self.resync_seconds
            report = {
                "loop": "running" if self.loop_running else "stopped",
                "passes": self.passes,
                "failures": self.failures,
                "consecutiveFailures": self.consecutive_failures,
                "restarts": self.restarts,
                "lastError": self.last_error,
                "secondsSinceLastPass": round(since, 3),
                "passInProgressSeconds": round(now - self.pass_started, 3) if self.pass_started else None,
                "stuckAfterSeconds": bound,
            }
            healthy = self.loop_running and since <= bound
        if not self.loop_running:
            report["problem"] = "the reconcile loop has stopped"
        elif not healthy:
            report["problem"] = f"no reconcile pass completed for {since:.0f}s (bound {bound:.0f}s)"
        return healthy, report

    def ready(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            report = {"primed": self.primed, "passes": self.passes}
            return self.primed and self.passes > 0, report


def serve(
    health: Health, port: int, address: str = "0.0.0.0", registry: CollectorRegistry | None = None
) -> ThreadingHTTPServer:
    """Serve the probes (and /metrics from `registry`) in a daemon thread; returns the server (shutdown() stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, report = health.live()
            elif path == "/readyz":
                ok, report = health.ready()
            elif path == "/metrics" and registry is not None:  # unauthenticated: see operator/metrics.py
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send_bytes(200, content_type, encoder(registry))
                return
            else:
                self._send(404, {"error": f"no such endpoint {path}; try /healthz, /readyz or /metrics"})
                return
            self._send(200 if ok else 503, report)

        def _send(self, code: int, body: dict[str, Any]) -> None:
            self._send_bytes(code, "application/json", json.dumps(body).encode())

        def _send_bytes(self, code: int, content_type: str, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a line
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    log.info("health endpoint listening", extra={"address": address, "port": server.server_address[1]})
    return server
