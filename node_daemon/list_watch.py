"""List+watch of one beekeeper kind by field selector, forever: the node daemon's watches.

Each round lists (handing over the whole listing, so a relist replaces what a watch gap
missed), then watches from the listing's resourceVersion until the server-side timeout,
an ERROR event (e.g. 410 Gone) or a failure, and lists again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, cast

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from beekeeper import kube
from beekeeper.crds.names import GROUP, VERSION

log = logging.getLogger(__name__)

WATCH_TIMEOUT_SECONDS = 300
WATCH_READ_SECONDS = WATCH_TIMEOUT_SECONDS + 30
"""A watch silent for longer than the server's own timeout is on a dead connection: relist."""
RETRY_SECONDS = 2.0


def list_watch(
    api: client.CustomObjectsApi,
    plural: str,
    selector: str,
    listed: Callable[[list[dict[str, Any]]], None],
    observed: Callable[[str, dict[str, Any]], None],
    stop: threading.Event,
    what: str,
    node: str,
) -> None:
    """Call listed(items) after every list and observed(type, object) for every watch event, until stop."""
    while not stop.is_set():
        try:
            listing = cast(
                dict[str, Any], api.list_cluster_custom_object(GROUP, VERSION, plural, field_selector=selector)
            )
            listed(listing["items"])
            stream = watch.Watch()
            for event in stream.stream(
                api.list_cluster_custom_object,
                GROUP,
                VERSION,
                plural,
                field_selector=selector,
                resource_version=listing["metadata"]["resourceVersion"],
                timeout_seconds=WATCH_TIMEOUT_SECONDS,
                allow_watch_bookmarks=True,
                _request_timeout=(kube.REQUEST_TIMEOUT[0], WATCH_READ_SECONDS),
            ):
                if stop.is_set():
                    stream.stop()
                    break
                if event["type"] == "ERROR":
                    break  # e.g. 410 Gone: relist
                if event["type"] == "BOOKMARK":
                    continue
                observed(event["type"], event["object"])
        except ApiException as exc:
            log.warning(f"{what} failed, retrying", extra={"node": node, "status": exc.status, "reason": exc.reason})
            stop.wait(RETRY_SECONDS)
        except Exception as exc:  # connection resets: keep going
            log.warning(f"{what} interrupted, retrying", extra={"node": node, "error": str(exc)})
            stop.wait(RETRY_SECONDS)
