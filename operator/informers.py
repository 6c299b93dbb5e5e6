"""The operator's reads of the API: one list+watch per kind feeding the cache, like client-go's reflectors.

Each kind is listed once (in pages), then watched from the list's resourceVersion with
bookmarks, so a reconnect resumes where it stopped and misses nothing. When the apiserver
cannot resume (410 Gone: the version is older than it keeps, e.g. after a restart), the
kind is listed again and its cache table REPLACED, dropping whatever vanished meanwhile.
The blocking kubernetes client runs in one thread per kind; results reach the cache on the
event loop through call_soon_threadsafe, in order.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from beekeeper import kube
from beekeeper.crds.names import (
    BPF_NODE_STATE_PLURAL,
    BPF_POLICY_SLICE_PLURAL,
    BPF_PROGRAM_PLURAL,
    GROUP,
    NETWORK_IDENTITY_PLURAL,
    NETWORK_IDENTITY_POLICY_PLURAL,
    RUNTIME_SECURITY_POLICY_PLURAL,
    VERSION,
)
from beekeeper.operator.cache import KINDS, ClusterCache, stored

log = logging.getLogger(__name__)

PAGE = 500
WATCH_SECONDS = 300
"""Server-side watch timeout; the watch is then resumed from the last resourceVersion."""
CONNECT_SECONDS = 10
BACKOFF_MAX_SECONDS = 2.5
"""An apiserver back after a restart is found within this (watches are cheap to re-open)."""

Lister = Callable[..., Any]
"""A kubernetes client list function taking the list/watch query parameters."""


class Gone(Exception):
    """The apiserver no longer has the resourceVersion to resume from: list again."""


def listers(api: client.ApiClient) -> dict[str, Lister]:
    """The list function of every cached kind."""
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

    def crd(plural: str) -> Lister:
        return functools.partial(custom.list_cluster_custom_object, GROUP, VERSION, plural)

    found: dict[str, Lister] = {
        "BpfProgram": crd(BPF_PROGRAM_PLURAL),
        "Node": core.list_node,
        "BpfNodeState": crd(BPF_NODE_STATE_PLURAL),
        "Pod": core.list_pod_for_all_namespaces,
        "Namespace": core.list_namespace,
        "NetworkIdentityPolicy": crd(NETWORK_IDENTITY_POLICY_PLURAL),
        "NetworkIdentity": crd(NETWORK_IDENTITY_PLURAL),
        "BpfPolicySlice": crd(BPF_POLICY_SLICE_PLURAL),
        "ConfigMap": core.list_config_map_for_all_namespaces,
        "RuntimeSecurityPolicy": crd(RUNTIME_SECURITY_POLICY_PLURAL),
    }
    assert set(found) == set(KINDS)
    return found


def _backoff(failures: int) -> float:
    return min(BACKOFF_MAX_SECONDS, 0.1 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)


def _raise_for_status(resp: Any) -> None:
    if not 200 <= resp.status <= 299:
        body = resp.data.decode(errors="replace") if resp.data else ""
        if resp.status == 410:
            raise Gone(body[:200])
        raise ApiException(status=resp.status, reason=resp.reason, body=body)


def _lines(resp: Any) -> Iterator[bytes]:
    """The watch stream's events, one JSON line each (only new bytes are searched: events can be MBs)."""
    pending = bytearray()
    for chunk in resp.stream(amt=None, decode_content=False):
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            pending += chunk[start:end]
            if pending.strip():
                yield bytes(pending)
            pending.clear()
            start = end + 1
        pending += chunk[start:]


class Informer:
    """List+watch of one kind, forever, in its own thread."""

    def __init__(self, kind: str, lister: Lister, loop: asyncio.AbstractEventLoop, cache: ClusterCache) -> None:
        self.kind = kind
        self.lister = lister
        self.loop = loop
        self.cache = cache
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"informer-{kind}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        version: str | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if version is None:
                    items, version = self._list()
                    self.loop.call_soon_threadsafe(self.cache.replace, self.kind, items)
                    log.info("listed", extra={"kind": self.kind, "objects": len(items), "resourceVersion": version})
                version = self._watch(version)
                failures = 0
            except Gone:
                log.info("watch expired, listing again", extra={"kind": self.kind, "resourceVersion": version})
                version = None
            except Exception as exc:  # transport errors, apiserver restarts: resume with back-off
                failures += 1
                delay = _backoff(failures)
                log.warning(
                    "watch interrupted, resuming",
                    extra={
                        "kind": self.kind,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                        "retryIn": round(delay, 2),
                    },
                )
                self.stopping.wait(delay)

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        token = None
        while True:
            kwargs = {"limit": PAGE, **({"_continue": token} if token else {})}
            resp = self.lister(**kwargs, _preload_content=False, _request_timeout=(CONNECT_SECONDS, 120))
            _raise_for_status(resp)
            page = json.loads(resp.data)
            items.extend(stored(self.kind, b) for b in page.get("items") or [])  # slimmed page by page: a bounded peak
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items, page["metadata"]["resourceVersion"]

    def _watch(self, version: str) -> str:
        """Deliver events until the server ends the watch; returns the resourceVersion to resume from."""
        resp = self.lister(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(CONNECT_SECONDS, WATCH_SECONDS + 30),
        )
        try:
            _raise_for_status(resp)
            for line in _lines(resp):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", ""))
                    raise ApiException(status=obj.get("code"), reason=obj.get("reason"), body=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self.loop.call_soon_threadsafe(self.cache.observe, self.kind, kind, obj)
        finally:
            resp.release_conn()
        return version


class ConfigMapFetcher:
    """Reads a ConfigMap once when a BpfProgram starts referencing it (later changes come by watch)."""

    def __init__(self, core: client.CoreV1Api, loop: asyncio.AbstractEventLoop, cache: ClusterCache) -> None:
        self.core = core
        self.loop = loop
        self.cache = cache
        self.wanted: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="configmap-fetcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while True:
            key = self.wanted.get()
            namespace, name = key.split("/", 1)
            failures = 0
            while True:
                try:
                    found = self.core.read_namespaced_config_map(name, namespace)
                    body = self.core.api_client.sanitize_for_serialization(found)
                    break
                except ApiException as exc:
                    if exc.status == 404:
                        body = None
                        break
                    error = f"{exc.status} {exc.reason}"
                except Exception as exc:  # transport errors
                    error = f"{type(exc).__name__}: {exc}"
                failures += 1
                log.warning("configmap read failed, retrying", extra={"configmap": key, "error": error[:300]})
                time.sleep(min(BACKOFF_MAX_SECONDS, 0.2 * 2 ** min(failures, 5)))
            self.loop.call_soon_threadsafe(self.cache.fetched, key, body)


def start(api: client.ApiClient, cache: ClusterCache, loop: asyncio.AbstractEventLoop) -> list[Informer]:
    """Start an informer per kind (and the ConfigMap fetcher); the cache is primed once each has listed.

    They share one client whose connection pool holds a connection per long-running watch.
    """
    configuration = copy.deepcopy(api.configuration)
    configuration.connection_pool_maxsize = len(KINDS) + 2
    user_agent = api.user_agent
    api = kube.bounded(client.ApiClient(configuration))
    api.user_agent = user_agent
    fetcher = ConfigMapFetcher(client.CoreV1Api(api), loop, cache)
    cache.on_unknown_configmap = fetcher.wanted.put
    fetcher.start()
    informers = [Informer(kind, lister, loop, cache) for kind, lister in listers(api).items()]
    for informer in informers:
        informer.start()
    return informers
