"""Render the chart with the pinned helm and validate it offline with kubeconform.

kubeconform has no network here, so its schemas are made locally: the built-in kinds' from the
test apiserver's OpenAPI v3 documents, beekeeper's from the CRDs generated from the models.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from beekeeper.devenv.chart_tools import ensure_chart_tools

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "beekeeper"
KUBE_VERSION = "1.34.4"
SCHEMA_LOCATION = "{{ .ResourceKind }}_{{ .Group }}_{{ .ResourceAPIVersion }}.json"
"""kubeconform's file name per kind: Group is the API group, or "v1" for the core group."""

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(ensure_chart_tools(lambda _: None).helm), *args], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(namespace: str, *values: str, release: str = "beekeeper", crds: bool = False) -> str:
    """`helm template` for a release in `namespace`; values are `--set` expressions."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    args += ["--include-crds"] if crds else []
    for value in values:
        args += ["--set", value]
    return helm(*args).stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def schema_file_name(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    return f"{kind.lower()}_{group or 'v1'}_{version}.json"


def strict_schema(node: Any) -> Any:
    """A Kubernetes OpenAPI schema as JSON schema validates it like the apiserver does.

    int-or-string becomes a oneOf; objects with declared properties refuse unknown ones (kubectl's
    and the apiserver's strict field validation), unless they preserve unknown fields. Walks schema
    positions only: property *names* such as "format" or "properties" are not keywords.
    """
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string") is True:
        return {**{k: v for k, v in node.items() if k not in ("type", "format", "anyOf")}, **INT_OR_STRING}
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    return out


def builtin_schemas(openapi_document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """File name -> JSON schema for each kind of one group-version's OpenAPI v3 document.

    Each file keeps the whole document's components, so its `#/components/schemas/...` references
    resolve inside the file.
    """
    components = {
        "schemas": {name: strict_schema(schema) for name, schema in openapi_document["components"]["schemas"].items()}
    }
    out = {}
    for name, schema in components["schemas"].items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            out[schema_file_name(api_version, gvk["kind"])] = {
                "$ref": f"#/components/schemas/{name}",
                "components": components,
            }
    return out


def crd_schemas(crds: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """File name -> JSON schema for every served version of some CRDs."""
    out = {}
    for crd in crds:
        spec = crd["spec"]
        for version in spec["versions"]:
            api_version = f"{spec['group']}/{version['name']}"
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            out[schema_file_name(api_version, spec["names"]["kind"])] = schema
    return out


def write_schemas(directory: Path, openapi: Callable[[str], dict[str, Any]], crds: Iterable[dict[str, Any]]) -> Path:
    """Write kubeconform's schema directory; openapi(path) returns one OpenAPI v3 document."""
    directory.mkdir(parents=True, exist_ok=True)
    schemas: dict[str, dict[str, Any]] = {}
    for path in openapi("/openapi/v3")["paths"]:
        if path == "api/v1" or (path.startswith("apis/") and path.count("/") == 2):
            schemas.update(builtin_schemas(openapi(f"/openapi/v3/{path}")))
    schemas.update(crd_schemas(crds))
    for name, schema in schemas.items():
        (directory / name).write_text(json.dumps(schema))
    return directory


def kubeconform(schema_dir: Path, manifests: str, *flags: str) -> subprocess.CompletedProcess[str]:
    tool = ensure_chart_tools(lambda _: None).kubeconform
    argv = [str(tool), "-strict", "-summary", "-output", "text", "-kubernetes-version", KUBE_VERSION]
    argv += ["-schema-location", f"{schema_dir}/{SCHEMA_LOCATION}", *flags, "-"]
    return subprocess.run(argv, input=manifests, capture_output=True, text=True, timeout=120)
