"""Kubernetes client plumbing shared by the CLI, the operator and the node daemon."""

from __future__ import annotations

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
    return api


def without_none(value: Any) -> Any:
    """A copy without None values: in a server-side apply a field left out is one the manager gives up."""
    if isinstance(value, Mapping):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def apply_custom(
    custom: client.CustomObjectsApi, plural: str, body: Mapping[str, Any], manager: str, status: bool = False
) -> dict[str, Any]:
    """Server-side apply of a custom object (or of its status subresource) as `manager`; returns it as stored.

    The fields in body become manager's; fields it applied before and leaves out now are
    removed. Conflicts with other managers are forced: each object part (spec, status) has
    one owner, so a top-level field of that part still set afterwards by someone else (a
    writer before server-side apply, a hand edit) is removed with a merge patch too.
    """
    group, version_ = body["apiVersion"].split("/")
    meta = body["metadata"]
    part = "status" if status else "spec"
    options: dict[str, Any] = {"field_manager": manager, "force": True, "_content_type": APPLY_PATCH}
    payload = without_none(body)
    scope = "namespaced" if meta.get("namespace") else "cluster"
    suffix = "_status" if status else ""
    where = (
        (group, version_, meta["namespace"], plural, meta["name"])
        if scope == "namespaced"
        else (group, version_, plural, meta["name"])
    )
    # By name: the client's stubs type each call's arguments one by one and its answer as object.
    call: Callable[..., Any] = getattr(custom, f"patch_{scope}_custom_object{suffix}")
    written: dict[str, Any] = call(*where, payload, **options)
    if written is None:  # created: the client maps only a 200 answer to the object, not a 201
        written = getattr(custom, f"get_{scope}_custom_object{suffix}")(*where)
    stale = {key: None for key in written.get(part) or {} if key not in payload.get(part, {})}
    if stale:
        written = call(*where, {part: stale})
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
