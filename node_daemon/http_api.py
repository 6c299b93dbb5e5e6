"""The daemon's HTTP endpoint: /metrics for Prometheus and /drops for "why was this flow dropped".

One small server on the metrics port, so anything that can scrape a node can also ask it
about drops (`beekeeper why-dropped --url http://NODE:9464`).

    GET /drops?src=IP&dst=IP&port=N&protocol=TCP&limit=N   JSON, newest first
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from beekeeper.node_daemon.drops import PROTOCOL_NUMBERS, DropLog

log = logging.getLogger(__name__)

MAX_LIMIT = 1000


class BadQuery(ValueError):
    pass


def drop_query(query: str) -> dict[str, Any]:
    """DropLog.query arguments from a query string; BadQuery names the parameter at fault."""
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    args: dict[str, Any] = {}
    for name in ("src", "dst"):
        if params.get(name):
            try:
                args[name] = str(ipaddress.IPv4Address(params[name]))
            except ValueError:
                raise BadQuery(f"{name}: {params[name]!r} is not an IPv4 address") from None
    if params.get("port"):
        if not params["port"].isdigit() or not 0 <= int(params["port"]) <= 65535:
            raise BadQuery(f"port: {params['port']!r} is not a port number")
        args["port"] = int(params["port"])
    if params.get("protocol"):
        protocol = params["protocol"].upper()
        if protocol not in PROTOCOL_NUMBERS:
            raise BadQuery(f"protocol: {params['protocol']!r} is not one of {', '.join(PROTOCOL_NUMBERS)}")
        args["protocol"] = PROTOCOL_NUMBERS[protocol]
    if params.get("limit"):
        if not params["limit"].isdigit() or not 1 <= int(params["limit"]) <= MAX_LIMIT:
            raise BadQuery(f"limit: must be between 1 and {MAX_LIMIT}")
        args["limit"] = int(params["limit"])
    return args


def serve(
    registry: CollectorRegistry, drops: DropLog, node: str, port: int, address: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Start the endpoint on a background thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(200, content_type, encoder(registry))
            elif url.path == "/drops":
                try:
                    args = drop_query(url.query)
                except BadQuery as exc:
                    self._send_json(400, {"error": str(exc)})
                    return
                self._send_json(200, {"node": node, "capacity": drops.capacity, "drops": drops.query(**args)})
            elif url.path == "/healthz":
                self._send(200, "text/plain", b"ok\n")
            else:
                self._send_json(404, {"error": f"no such path {url.path}; try /metrics or /drops"})

        def _send_json(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, "application/json", json.dumps(body).encode())

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("serving /metrics and /drops", extra={"address": address, "port": port})
    return server
