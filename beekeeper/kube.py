"""Kubernetes client plumbing shared by the CLI, the operator and the node daemon."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from beekeeper.version import version as beekeeper_version

log = logging.getLogger(__name__)

FIELD_MANAGER = "beekeeper"
OPERATOR_MANAGER = "beekeeper-operator"
NODE_DAEMON_MANAGER = "beekeeper-node-daemon"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = (10.0, 75.0)
"""(connect, read) seconds for a request that names no timeout of its own: the apiserver answers every
request within its own 60 s (--request-timeout), so silence beyond that is a dead connection (a
partition, a vanished load balancer), which would otherwise block the caller for good."""


def api_client(kubeconfig: Path | str | None = None, manager: str = FIELD_MANAGER) -> client.ApiClient:
    """A client from an explicit kubeconfig, $KUBECONFIG/~/.kube/config, or the in-cluster service account.

    Its User-Agent is `manager/version`: the apiserver names the field manager of a write
    without an explicit fieldManager after the agent's first segment, so `managedFields`
    (and audit logs) say which component wrote what, not the client's `OpenAPI-Generator`.
    """
    if kubeconfig:
        api = config.new_client_from_config(config_file=str(kubeconfig))
    else:
        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            # The client reads $KUBECONFIG once, at import; `beekeeper operator --kubeconfig` sets it later.
            api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    api.user_agent = f"{manager}/{beekeeper_version()}"
    return bounded(api)


def bounded(api: client.ApiClient) -> client.ApiClient:
    """api, its requests without a timeout of their own given REQUEST_TIMEOUT (watches name a longer one)."""
    request: Callable[..., Any] = api.rest_client.request

    @functools.wraps(request)
    def call(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return request(*args, _request_timeout=_request_timeout or REQUEST_TIMEOUT, **kwargs)

    api.rest_client.request = call  # type: ignore[method-assign]
    return api


def without_none(value: Any) -> Any:
    """A copy without None values: in a server-side apply a field left out is one the manager gives up."""
    if isinstance(value, Mapping):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def request_json(
    api: client.ApiClient,
    method: str,
    path: str,
    body: Any = None,
    query: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    """One request through api's connection pool and credentials, JSON in and out.

    The generated client validates every argument with pydantic, walks the body to sanitise
    it and parses the answer's headers for its type: most of a small write's client CPU,
    which the operator pays once per node in a rollout. Errors raise the client's ApiException.
    """
    _, url, headers, _, _ = api.param_serialize(
        method,
        path,
        query_params=list((query or {}).items()),
        header_params={"Accept": "application/json", "Content-Type": content_type},
        auth_settings=["BearerToken"],
    )
    response = api.rest_client.request(method, url, headers=headers, body=body)
    data = response.read()
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=data.decode(errors="replace"), data=None)
    answer: dict[str, Any] = json.loads(data)
    return answer


def custom_object_path(api_version: str, plural: str, name: str | None, namespace: str | None = None) -> str:
    """The REST path of one custom object (name None: of its collection)."""
    where = f"namespaces/{namespace}/" if namespace else ""
    return f"/apis/{api_version}/{where}{plural}" + (f"/{name}" if name else "")


def apply_custom(
    custom: client.CustomObjectsApi, plural: str, body: Mapping[str, Any], manager: str, status: bool = False
) -> dict[str, Any]:
    """Server-side apply of a custom object (or of its status subresource) as `manager`; returns it as stored.

    The fields in body become manager's; fields it applied before and leaves out now are
    removed. Conflicts with other managers are forced: each object part (spec, status) has
    one owner, so a top-level field of that part still set afterwards by someone else (a
    writer before server-side apply, a hand edit) is removed with a merge patch too.
    """
    meta = body["metadata"]
    part = "status" if status else "spec"
    payload = without_none(body)
    path = custom_object_path(body["apiVersion"], plural, meta["name"], meta.get("namespace"))
    path += "/status" if status else ""
    api = custom.api_client
    query = {"fieldManager": manager, "force": "true"}
    written = request_json(api, "PATCH", path, payload, query, APPLY_PATCH)  # 200 updated, 201 created
    stale = {key: None for key in written.get(part) or {} if key not in payload.get(part, {})}
    if stale:
        written = request_json(api, "PATCH", path, {part: stale}, content_type=MERGE_PATCH)
    return written


def apply(api: client.ApiClient, manifest: dict, field_manager: str = FIELD_MANAGER) -> dict:
    """Server-side apply one object; the apiserver merges and owns conflicts per field manager."""
    dyn = DynamicClient(api)
    resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
    namespace = manifest["metadata"].get("namespace") if resource.namespaced else None
    result = dyn.server_side_apply(
        resource,
        body=manifest,
        name=manifest["metadata"]["name"],
        namespace=namespace,
        field_manager=field_manager,
        force_conflicts=True,
    )
    return result.to_dict()


def install_crds(api: client.ApiClient, manifests: Iterable[dict], timeout: float = 60.0) -> list[str]:
    """Apply CRDs and wait until each is Established (served), so clients can use them at once."""
    ext = client.ApiextensionsV1Api(api)
    manifests_list = list(manifests)
    names = []
    for manifest in manifests_list:
        apply(api, manifest)
        names.append(manifest["metadata"]["name"])
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            crd = ext.read_custom_resource_definition(name)
            conditions = {c.type: c.status for c in ((crd.status and crd.status.conditions) or [])}
            if conditions.get("Established") == "True":
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"CRDs not Established after {timeout:.0f}s: {sorted(pending)}")
        if pending:
            time.sleep(0.1)
    _wait_openapi_published(api, manifests_by_group(manifests_list), deadline)
    # Discovery caches are stale right after CRD creation.
    DynamicClient(api).resources.invalidate_cache()
    return names


def manifests_by_group(manifests: list[dict]) -> dict[str, set[str]]:
    """{"group/version": {kind, ...}} of the served versions of some CRDs."""
    wanted: dict[str, set[str]] = {}
    for crd in manifests:
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                gv = f"{crd['spec']['group']}/{version['name']}"
                wanted.setdefault(gv, set()).add(crd["spec"]["names"]["kind"])
    return wanted


def _wait_openapi_published(api: client.ApiClient, wanted: dict[str, set[str]], deadline: float) -> None:
    """Established is not enough for `kubectl explain`: the OpenAPI v3 document lags a few seconds."""
    for gv, kinds in wanted.items():
        group, version = gv.split("/")
        suffix = {f"{'.'.join(reversed(group.split('.')))}.{version}.{kind}" for kind in kinds}
        while True:
            try:
                method, url, headers, body, post = api.param_serialize(
                    "GET",
                    f"/openapi/v3/apis/{gv}",
                    header_params={"Accept": "application/json"},
                    auth_settings=["BearerToken"],
                )
                response = api.call_api(method, url, headers, body, post)
                doc = json.loads(response.read()) if response.status == 200 else {}
                schemas = set((doc or {}).get("components", {}).get("schemas", {}))
                if suffix <= schemas:
                    break
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"OpenAPI for {gv} not published in time (kinds {sorted(kinds)})")
            time.sleep(0.2)


def register_node(api: client.ApiClient, name: str, labels: dict[str, str] | None = None) -> None:
    """Create or relabel a Node object; on a real cluster the kubelet does this, here we stand in for it."""
    core = client.CoreV1Api(api)
    all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}}
    try:
        core.create_node(body)  # type: ignore[arg-type]  # the client sends a dict body as it is
        log.info("registered node", extra={"node": name})
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.patch_node(name, {"metadata": {"labels": all_labels}})


def api_message(exc: ApiException) -> str:
    """The apiserver's own words from a refused request (its Status message), else the raw body."""
    try:
        return json.loads(exc.body or "")["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body)
