"""The daemon's HTTP endpoint: /metrics for Prometheus and /drops for "why was this flow dropped".

One small server on the metrics port, so anything that can scrape a node can also ask it
about drops (`beekeeper why-dropped --url https://NODE:9464`).

    GET /metrics                                             Prometheus text / OpenMetrics
    GET /drops?src=IP&dst=IP&port=N&protocol=TCP&limit=N     JSON, newest first
    GET /exec-events?since=N&wait=S&namespace=&pod=&policy=  JSON, oldest first (long-poll with wait)
    GET /healthz                                             no credentials needed (probes)

/drops names pods, IPs, ports and policies of every namespace on the node, and /metrics
the policies of every namespace: both need a caller the API authenticates and authorizes
(node_daemon.access), like the kubelet's endpoints. 401 without credentials, 403 without
the permission. With a serving certificate the port speaks TLS, and with --client-ca-file
it also accepts client certificates signed by the cluster's client CA.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from beekeeper.crds.names import BPF_NODE_STATE_PLURAL, GROUP
from beekeeper.node_daemon.access import ApiAccess, Permission, ReviewUnavailable, User, certificate_user
from beekeeper.node_daemon.drops import PROTOCOL_NUMBERS, DropLog
from beekeeper.node_daemon.runtime_events import FILTERS as EXEC_EVENT_FILTERS
from beekeeper.node_daemon.runtime_events import ExecEventLog

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
REQUEST_TIMEOUT = 10.0
"""Seconds a connection may take to finish its TLS handshake or send a request."""
METRICS_PERMISSION = Permission("get", path="/metrics")


def drops_permission(node: str) -> Permission:
    """get on the drops subresource of this node's BpfNodeState; RBAC: resources [bpfnodestates/drops] in
    group beekeeper.dev, optionally resourceNames [<node>]."""
    return Permission("get", group=GROUP, resource=BPF_NODE_STATE_PLURAL, subresource="drops", name=node)


def exec_events_permission(node: str) -> Permission:
    """get on the execevents subresource of this node's BpfNodeState (RBAC: bpfnodestates/execevents)."""
    return Permission("get", group=GROUP, resource=BPF_NODE_STATE_PLURAL, subresource="execevents", name=node)


def tls_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """Server TLS; with a client CA, client certificates it signed identify their callers (optional)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


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


MAX_WAIT_SECONDS = 30


def exec_event_query(query: str) -> dict[str, Any]:
    """ExecEventLog.query arguments from a query string; BadQuery names the parameter at fault."""
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    args: dict[str, Any] = {k: params[k] for k in EXEC_EVENT_FILTERS if params.get(k)}
    for name, top in (("since", 2**63), ("limit", MAX_LIMIT), ("wait", MAX_WAIT_SECONDS)):
        if params.get(name):
            if not params[name].isdigit() or int(params[name]) > top:
                raise BadQuery(f"{name}: must be a whole number up to {top}")
            args[name] = int(params[name])
    return args


def serve(
    registry: CollectorRegistry,
    drops: DropLog,
    node: str,
    port: int,
    address: str,
    access: ApiAccess,
    tls: ssl.SSLContext | None = None,
    exec_events: ExecEventLog | None = None,
) -> ThreadingHTTPServer:
    """Start the endpoint on a background thread."""

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT

        def setup(self) -> None:
            super().setup()
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()  # here, on this request's thread, within the timeout

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/healthz":
                self._send(200, "text/plain", b"ok\n")
            elif url.path == "/metrics":
                if self._allowed(METRICS_PERMISSION):
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, content_type, encoder(registry))
            elif url.path == "/drops":
                try:
                    args = drop_query(url.query)
                except BadQuery as exc:
                    self._send_json(400, {"error": str(exc)})
                    return
                if self._allowed(drops_permission(node)):
                    self._send_json(200, {"node": node, "capacity": drops.capacity, "drops": drops.query(**args)})
            elif url.path == "/exec-events" and exec_events is not None:
                try:
                    args = exec_event_query(url.query)
                except BadQuery as exc:
                    self._send_json(400, {"error": str(exc)})
                    return
                if self._allowed(exec_events_permission(node)):
                    found, next_since = exec_events.query(**args)
                    self._send_json(200, {"node": node, "events": found, "next": next_since})
            else:
                self._send_json(404, {"error": f"no such path {url.path}; try /metrics or /drops"})

        def _allowed(self, permission: Permission) -> bool:
            """Authenticate and authorize the caller; answers 401/403/503 itself when not allowed."""
            try:
                user = self._user()
                if user is None:
                    self._send_json(
                        401,
                        {"error": "authentication required: a bearer token or a client certificate the cluster trusts"},
                        {"WWW-Authenticate": 'Bearer realm="beekeeper-node-daemon"'},
                    )
                    return False
                allowed, reason = access.authorize(user, permission)
            except ReviewUnavailable as exc:
                log.warning("cannot review a request", extra={"path": self.path, "error": str(exc)})
                self._send_json(503, {"error": f"cannot check credentials with the API: {exc}"})
                return False
            if not allowed:
                message = f"forbidden: user {user.name!r} may not {permission}" + (f": {reason}" if reason else "")
                self._send_json(403, {"error": message})
            return allowed

        def _user(self) -> User | None:
            if isinstance(self.connection, ssl.SSLSocket) and (cert := self.connection.getpeercert()):
                return certificate_user(cert)  # verified against the client CA during the handshake
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return access.authenticate(token.strip())
            return None

        def _send_json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send(code, "application/json", json.dumps(body).encode(), headers)

        def _send(self, code: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("http connection failed", exc_info=True, extra={"client": str(client_address)})

    server = Server((address, port), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info(
        "serving /metrics and /drops",
        extra={"address": address, "port": port, "tls": tls is not None, "clientCerts": _client_certs(tls)},
    )
    return server


def _client_certs(tls: ssl.SSLContext | None) -> bool:
    return tls is not None and tls.verify_mode != ssl.CERT_NONE
