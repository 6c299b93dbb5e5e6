"""The committed CRDs match the models, and the generated schemas are structural and documented."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import ConfigDict, Field, StrictInt, StrictStr

from beekeeper.crds import generate
from beekeeper.crds.common import ApiModel, cel, validations
from beekeeper.crds.names import CATEGORY, GROUP, VERSION
from beekeeper.crds.resources import RESOURCES
from beekeeper.crds.schema import (
    INT_OR_STRING_BRANCHES,
    SchemaError,
    model_schema,
    reflow,
    structural_problems,
    walk,
)

CRD_DIR = Path(generate.__file__).resolve().parent
MANIFESTS = {m["spec"]["names"]["kind"]: m for m in generate.crd_manifests()}


def schema_of(kind: str) -> dict[str, Any]:
    return MANIFESTS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def resolve(schema: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """The schema node at a path like `.status.conditions` or `.spec.programs[0].name` (list indexes skipped)."""
    node: dict[str, Any] | None = schema
    for part in re.findall(r"[A-Za-z0-9_]+", dotted):
        if node is None:
            return None
        if node.get("type") == "array":
            node = node["items"]
            if part.isdigit():
                continue
        node = node.get("properties", {}).get(part)
    return node


# --------------------------------------------------------------------------------------
# Committed files
# --------------------------------------------------------------------------------------


def test_committed_crds_match_the_models() -> None:
    stale = generate.stale_files()
    assert not stale, f"crds/*.yaml are stale ({', '.join(sorted(stale))}): {generate.REGENERATE_HINT}\n\n" + "\n".join(
        stale.values()
    )


def test_chart_crds_match_the_models() -> None:
    """helm installs helm/beekeeper/crds/ as they are: they must be the models' CRDs too."""
    stale = generate.stale_files(generate.CHART_CRD_DIR)
    assert not stale, f"helm/beekeeper/crds/ is stale: {generate.REGENERATE_HINT}\n\n" + "\n".join(stale.values())


@pytest.mark.parametrize("directory", [CRD_DIR, generate.CHART_CRD_DIR], ids=["crds", "chart"])
def test_no_orphan_crd_files(directory: Path) -> None:
    expected = {generate.file_name(r) for r in RESOURCES}
    present = {p.name for p in directory.glob("*.yaml")}
    assert present == expected, f"remove CRD files in {directory} whose resource no longer exists"


def test_committed_yaml_parses_to_the_manifests() -> None:
    for resource in RESOURCES:
        committed = yaml.safe_load((CRD_DIR / generate.file_name(resource)).read_text())
        assert committed == generate.crd_manifest(resource)


def test_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--output-dir", str(tmp_path)]) == 0
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 0
    target = tmp_path / generate.file_name(RESOURCES[0])
    target.write_text(target.read_text().replace("description:", "description: edited", 1))
    capsys.readouterr()
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "edited" in out and "python -m beekeeper.crds.generate" in err
    (tmp_path / generate.file_name(RESOURCES[1])).unlink()
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 1


def test_check_mode_covers_the_chart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--check` (default directories) fails when only the chart's copy is stale."""
    crds, chart = tmp_path / "crds", tmp_path / "helm" / "beekeeper" / "crds"
    monkeypatch.setattr(generate, "CRD_DIR", crds)
    monkeypatch.setattr(generate, "CHART_CRD_DIR", chart)
    crds.mkdir()
    chart.parent.mkdir(parents=True)
    assert generate.main(["--output-dir", str(crds)]) == 0
    assert sorted(p.name for p in chart.iterdir()) == sorted(generate.rendered_files())
    assert generate.main(["--check", "--output-dir", str(crds)]) == 0
    (chart / generate.file_name(RESOURCES[0])).write_text("# edited\n")
    assert generate.main(["--check", "--output-dir", str(crds)]) == 1


def test_generation_is_deterministic() -> None:
    assert generate.rendered_files() == generate.rendered_files()


# --------------------------------------------------------------------------------------
# CRD metadata
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.__name__)
def test_crd_metadata(resource: Any) -> None:
    crd = MANIFESTS[resource.names.kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{resource.names.plural}.{GROUP}"
    assert spec["group"] == GROUP
    assert spec["scope"] == ("Namespaced" if resource.names.namespaced else "Cluster")
    assert spec["names"]["categories"] == [CATEGORY]
    assert spec["names"]["shortNames"], "every resource has a short name"
    assert spec["names"]["listKind"] == f"{resource.names.kind}List"
    [version] = spec["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.__name__)
def test_printer_columns_point_at_schema_fields(resource: Any) -> None:
    crd = MANIFESTS[resource.names.kind]
    [version] = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    columns = version["additionalPrinterColumns"]
    assert columns[-1]["name"] == "Age"
    for column in columns:
        path = column["jsonPath"]
        if path.startswith(".metadata."):
            continue
        path = re.sub(r"\[\?\(@\.type==\"(\w+)\"\)\]", "", path)  # condition filters select list items
        node = resolve(schema, path)
        assert node is not None, f"column {column['name']} reads {column['jsonPath']}, which is not in the schema"
        if column["type"] == "integer":
            assert node.get("type") == "integer", column
        if "conditions[" in column["jsonPath"] and column["jsonPath"].endswith(".status"):
            assert node.get("enum") == ["True", "False", "Unknown"]


def test_expected_printer_columns() -> None:
    def cols(kind: str, wide: bool = False) -> list[str]:
        columns = MANIFESTS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
        return [c["name"] for c in columns if bool(c.get("priority")) == wide]

    assert cols("BpfProgram") == ["Ready", "Status", "Age"]
    assert cols("BpfProgram", wide=True) == ["Failed", "Reason", "Types"]
    assert cols("NetworkIdentityPolicy") == ["Valid", "Ready", "Endpoints", "Nodes", "Age"]
    assert cols("NetworkIdentityPolicy", wide=True) == ["Reason", "Types"]
    assert cols("BpfNodeState") == ["Programs", "Ready", "Kernel", "Age"]
    # Cluster-scoped: a column named Namespace would read as the object's own (kubectl prints NAMESPACE).
    assert "Namespace" not in cols("NetworkIdentity")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_descriptions_are_not_hard_wrapped(kind: str) -> None:
    """kubectl explain wraps by itself: a docstring's line break would show up mid-sentence."""
    schema = MANIFESTS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        for paragraph in node.get("description", "").split("\n\n"):
            assert "\n" not in paragraph, f"{kind} {path or '<root>'}: {paragraph!r}"


def test_reflow_keeps_paragraphs_and_list_items() -> None:
    text = "One sentence\n    across lines.\n\nA list:\n- first\n  item\n- second"
    assert reflow(text) == "One sentence across lines.\n\nA list:\n- first item\n- second"


@pytest.mark.parametrize("kind", ["BpfProgram", "NetworkIdentityPolicy", "RuntimeSecurityPolicy"])
def test_user_applied_kinds_store_observed_generation_zero_on_create(kind: str) -> None:
    """The apiserver fills in status: {observedGeneration: 0}, so kstatus reads a new object as InProgress."""
    status = MANIFESTS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["default"] == {}
    assert status["properties"]["observedGeneration"]["default"] == 0


# --------------------------------------------------------------------------------------
# Schema shape
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_schema_is_structural_and_documented(kind: str) -> None:
    assert structural_problems(schema_of(kind)) == []


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_property_has_a_description(kind: str) -> None:
    missing = [
        path
        for path, node in walk(schema_of(kind))
        if path and not path.endswith(("[]", "{}")) and path != "metadata" and not node.get("description")
    ]
    assert missing == []


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_no_references_titles_or_unknown_fields_escape_hatch(kind: str) -> None:
    text = json.dumps(schema_of(kind))
    for forbidden in ('"$ref"', '"$defs"', '"title"', '"oneOf"', '"allOf"', "preserve-unknown-fields", '"nullable"'):
        assert forbidden not in text


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_cel_rules_are_well_formed(kind: str) -> None:
    for path, node in walk(schema_of(kind)):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message") or rule.get("messageExpression"), (path, rule)
            assert rule.get("reason", "FieldValueInvalid") in {
                "FieldValueInvalid",
                "FieldValueRequired",
                "FieldValueForbidden",
                "FieldValueDuplicate",
            }
            if "fieldPath" in rule:
                target = resolve(node, rule["fieldPath"])
                assert target is not None, f"{path}: fieldPath {rule['fieldPath']} does not exist"
            # Fields a rule dereferences must exist (a typo would fail at the apiserver only on use).
            for name in re.findall(r"self\.([A-Za-z_]+)", rule["rule"]):
                if name in ("all", "exists", "exists_one", "map", "filter", "size", "matches", "contains"):
                    continue
                if node.get("type") == "object" and "properties" in node:
                    assert name in node["properties"] or name == "metadata", f"{path}: rule uses unknown {name}"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_lists_and_strings_that_cel_iterates_are_bounded(kind: str) -> None:
    """Unbounded lists/strings under CEL rules blow the apiserver's cost estimate; keep them bounded."""

    def check(node: dict[str, Any], path: str, under_rule: bool) -> None:
        under_rule = under_rule or bool(node.get("x-kubernetes-validations"))
        if under_rule and node.get("type") == "array":
            assert "maxItems" in node, f"{path}: list under a CEL rule needs maxItems"
        if under_rule and node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: map under a CEL rule needs maxProperties"
        if node.get("x-kubernetes-validations") and (node.get("type") == "string" or "anyOf" in node):
            assert "maxLength" in node or "enum" in node, f"{path}: string with a CEL rule needs maxLength"
        for name, sub in node.get("properties", {}).items():
            check(sub, f"{path}.{name}", False)
        if "items" in node:
            check(node["items"], f"{path}[]", under_rule)
        if isinstance(node.get("additionalProperties"), dict):
            check(node["additionalProperties"], f"{path}{{}}", under_rule)

    # A CEL rule on a list item is multiplied by every enclosing list, so bound the enclosing lists too.
    def enclosing(node: dict[str, Any], path: str, lists: list[str]) -> None:
        if node.get("x-kubernetes-validations"):
            for outer in lists:
                assert outer, f"{path}: a CEL rule inside an unbounded list"
        for name, sub in node.get("properties", {}).items():
            enclosing(sub, f"{path}.{name}", lists)
        if "items" in node:
            enclosing(node["items"], f"{path}[]", [*lists, "maxItems" in node and path])

    schema = schema_of(kind)
    check(schema, "", False)
    enclosing(schema, "", [])


def test_bpfprogram_schema_essentials() -> None:
    spec = schema_of("BpfProgram")["properties"]["spec"]
    programs = spec["properties"]["programs"]
    assert programs["x-kubernetes-list-type"] == "map" and programs["x-kubernetes-list-map-keys"] == ["name"]
    assert programs["minItems"] == 1 and programs["maxItems"] == 64
    item = programs["items"]
    assert item["properties"]["type"]["enum"] == [
        "xdp",
        "tc",
        "tracepoint",
        "raw_tracepoint",
        "uprobe",
        "uretprobe",
        "kprobe",
        "kretprobe",
        "cgroup_skb",
        "cgroup_sock_addr",
        "fentry",
        "fexit",
        "lsm",
    ]
    assert "default" not in item["properties"]["xdpMode"], "a default would be forbidden on non-xdp programs"
    field_paths = {r.get("fieldPath") for r in item["x-kubernetes-validations"]}
    assert {".direction", ".interfaceSelector", ".xdpMode", ".binary", ".tracepoint"} <= field_paths
    assert spec["required"] == ["programs"], "source or bytecode: a CEL rule requires exactly one"
    assert schema_of("BpfProgram")["required"] == ["spec"]


def test_network_policy_port_is_int_or_string() -> None:
    spec = schema_of("NetworkIdentityPolicy")["properties"]["spec"]
    port = spec["properties"]["ingress"]["items"]["properties"]["ports"]["items"]["properties"]["port"]
    assert port["x-kubernetes-int-or-string"] is True
    assert port["anyOf"] == INT_OR_STRING_BRANCHES
    assert "type" not in port
    protocol = spec["properties"]["egressDeny"]["items"]["properties"]["ports"]["items"]["properties"]["protocol"]
    assert protocol["default"] == "TCP"
    peer = spec["properties"]["ingress"]["items"]["properties"]["from"]["items"]
    assert set(peer["properties"]) == {"podSelector", "namespaceSelector", "ipBlock"}
    assert "except" in peer["properties"]["ipBlock"]["properties"]


def test_conditions_are_keyed_by_type() -> None:
    for kind in MANIFESTS:
        if "status" not in schema_of(kind)["properties"]:
            continue  # NetworkIdentity is spec-only
        conditions = schema_of(kind)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        item = conditions["items"]
        assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
        assert item["properties"]["lastTransitionTime"]["format"] == "date-time"


def test_status_is_optional_everywhere() -> None:
    for kind in MANIFESTS:
        status = schema_of(kind)["properties"].get("status", {})
        assert not status.get("required")


# --------------------------------------------------------------------------------------
# The converter itself
# --------------------------------------------------------------------------------------


class Colour(StrEnum):
    """A colour."""

    RED = "red"
    BLUE = "blue"


class Inner(ApiModel):
    """Inner doc."""

    model_config = ConfigDict(json_schema_extra=validations(cel("self.n > 0", "n must be positive")))

    n: int = Field(description="A number.")


class Sample(ApiModel):
    """Sample doc."""

    optional_inner: Inner | None = Field(
        None, description="Field doc wins.", json_schema_extra=validations(cel("has(self.n)", "needs n"))
    )
    colour: Colour = Field(Colour.RED, description="Enum with default.")
    port: StrictInt | StrictStr | None = Field(None, description="Int or string.")
    positive: int = Field(1, gt=0, description="Exclusive minimum.")
    tags: list[str] = Field(default_factory=list, description="Empty default is not materialised.")
    labels: dict[str, str] | None = Field(None, description="A map.")


def test_converter_inlines_and_flattens() -> None:
    schema = model_schema(Sample)
    props = schema["properties"]
    inner = props["optionalInner"]
    assert inner["description"] == "Field doc wins."
    assert inner["type"] == "object" and inner["required"] == ["n"]
    assert [r["rule"] for r in inner["x-kubernetes-validations"]] == ["self.n > 0", "has(self.n)"]
    assert props["colour"] == {
        "description": "Enum with default.",
        "type": "string",
        "enum": ["red", "blue"],
        "default": "red",
    }
    assert props["port"] == {
        "description": "Int or string.",
        "x-kubernetes-int-or-string": True,
        "anyOf": INT_OR_STRING_BRANCHES,
    }
    assert props["positive"]["minimum"] == 0 and props["positive"]["exclusiveMinimum"] is True
    assert "default" not in props["tags"]
    assert props["labels"] == {"description": "A map.", "type": "object", "additionalProperties": {"type": "string"}}
    assert "additionalProperties" not in schema, "extra=forbid is not expressed as additionalProperties: false"
    assert structural_problems(schema) == []


def test_converter_refuses_non_structural_unions() -> None:
    class Bad(ApiModel):
        """Bad."""

        value: int | list[int] = Field(description="Not structural.")

    with pytest.raises(SchemaError, match="not structural"):
        model_schema(Bad)


def test_converter_refuses_constrained_int_or_string_branches() -> None:
    class Bad(ApiModel):
        """Bad."""

        value: StrictInt | Annotated[StrictStr, Field(max_length=3)] = Field(description="Constraint would be lost.")

    with pytest.raises(SchemaError, match="int-or-string"):
        model_schema(Bad)


def test_structural_problems_reports_missing_descriptions() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"anyOf": [{"type": "string"}]}}}
    problems = structural_problems(schema)
    assert any("a: no description" in p for p in problems)
    assert any("b: anyOf outside int-or-string" in p for p in problems)
