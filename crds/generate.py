"""Generate the CustomResourceDefinitions from the models, or check the committed ones.

    python -m beekeeper.crds.generate            # (re)write crds/ and helm/beekeeper/crds/
    python -m beekeeper.crds.generate --check    # exit 1 with a diff if they are stale

The chart carries the same files in helm/beekeeper/crds/ (helm installs that folder before
the templates). Everything else (the operator, tests) gets the manifests from `crd_manifests()`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from beekeeper.crds.common import Resource
from beekeeper.crds.names import CATEGORY, GROUP, VERSION
from beekeeper.crds.resources import RESOURCES
from beekeeper.crds.schema import SchemaError, model_schema, structural_problems

CRD_DIR = Path(__file__).resolve().parent
CHART_CRD_DIR = CRD_DIR.parent / "helm" / "beekeeper" / "crds"
"""Only in a source checkout; an installed beekeeper has no chart next to its models."""
REGENERATE_HINT = "run `python -m beekeeper.crds.generate` and commit the result"

_API_VERSION_DESCRIPTION = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
    "recognized schemas to the latest internal value, and may reject unrecognized values."
)
_KIND_DESCRIPTION = (
    "Kind is a string value representing the REST resource this object represents. Servers may infer this "
    "from the endpoint the client submits requests to. In CamelCase."
)


def openapi_schema(resource: type[Resource]) -> dict[str, Any]:
    """The CRD's openAPIV3Schema: the model's schema with the standard apiVersion/kind/metadata."""
    schema = model_schema(resource)
    props = schema["properties"]
    props["apiVersion"] = {"description": _API_VERSION_DESCRIPTION, "type": "string"}
    props["kind"] = {"description": _KIND_DESCRIPTION, "type": "string"}
    props["metadata"] = {"type": "object"}
    schema["properties"] = {
        "apiVersion": props.pop("apiVersion"),
        "kind": props.pop("kind"),
        "metadata": props.pop("metadata"),
        **props,
    }
    problems = structural_problems(schema)
    if problems:
        raise SchemaError(f"{resource.__name__}: " + "; ".join(problems))
    return schema


def crd_manifest(resource: type[Resource]) -> dict[str, Any]:
    """One CustomResourceDefinition as a dict, ready for server-side apply."""
    names = resource.names
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": names.crd_name,
            "labels": {"app.kubernetes.io/name": "beekeeper", "app.kubernetes.io/part-of": "beekeeper"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": names.kind,
                "listKind": names.list_kind,
                "plural": names.plural,
                "singular": names.singular,
                "shortNames": list(names.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced" if names.namespaced else "Cluster",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.to_dict() for c in resource.printer_columns],
                    "schema": {"openAPIV3Schema": openapi_schema(resource)},
                }
            ],
        },
    }


def crd_manifests() -> list[dict[str, Any]]:
    """Every beekeeper CRD, generated from the models (not read from the committed YAML)."""
    return [crd_manifest(r) for r in RESOURCES]


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, no anchors: stable, reviewable diffs."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(resource: type[Resource]) -> str:
    """The YAML text of one CRD file, header included."""
    module = resource.__module__.rsplit(".", 1)[-1]
    header = f"# Generated from crds/{module}.py by `python -m beekeeper.crds.generate`. Do not edit by hand.\n"
    body = yaml.dump(crd_manifest(resource), Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)
    return header + body


def file_name(resource: type[Resource]) -> str:
    return f"{resource.names.crd_name}.yaml"


def rendered_files() -> dict[str, str]:
    """File name -> expected content, for every CRD."""
    return {file_name(r): render(r) for r in RESOURCES}


def stale_files(directory: Path = CRD_DIR) -> dict[str, str]:
    """File name -> unified diff for every CRD file that is missing or differs from the models."""
    stale = {}
    for name, expected in rendered_files().items():
        path = directory / name
        actual = path.read_text() if path.exists() else ""
        if actual != expected:
            shown = path.relative_to(CRD_DIR.parent) if path.is_relative_to(CRD_DIR.parent) else path
            diff = difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                fromfile=f"{shown} (committed)",
                tofile=f"{shown} (from the models)",
            )
            stale[name] = "".join(diff)
    return stale


def write(directory: Path = CRD_DIR) -> list[Path]:
    written = []
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in rendered_files().items():
        path = directory / name
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beekeeper.crds.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when the committed CRDs are stale")
    parser.add_argument("--output-dir", type=Path, default=CRD_DIR, help=f"default: {CRD_DIR}")
    args = parser.parse_args(argv)
    directories = [args.output_dir]
    if args.output_dir == CRD_DIR and CHART_CRD_DIR.parent.is_dir():
        directories.append(CHART_CRD_DIR)
    if args.check:
        stale = {f"{d}/{name}": diff for d in directories for name, diff in stale_files(d).items()}
        for diff in stale.values():
            sys.stdout.write(diff)
        if stale:
            print(f"\nstale CRDs: {', '.join(sorted(stale))}; {REGENERATE_HINT}", file=sys.stderr)
            return 1
        print("CRDs are up to date", file=sys.stderr)
        return 0
    for path in (p for d in directories for p in write(d)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
