"""Pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema.

Pydantic emits JSON Schema 2020-12 with `$defs`/`$ref`, `anyOf` for Optional, `title`s and
`const`. The apiserver wants a *structural* schema: every node typed, no references, no
`anyOf` that changes the type (except the int-or-string idiom), `exclusiveMinimum` as a
boolean. This module translates mechanically and refuses anything it does not understand,
so a new pydantic construct fails generation instead of being silently dropped.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

VALIDATIONS = "x-kubernetes-validations"
SERVER_DEFAULT = "x-beekeeper-server-default"
"""A `json_schema_extra` key whose value becomes the node's `default` as is, objects included.

Object defaults are otherwise dropped (they would materialise in every stored object); this
is for the few that must, like `status: {}` so that `status.observedGeneration: 0` is stored
on create and kstatus reads a new object as InProgress rather than Current.
"""

# Keywords copied through unchanged (after their children are converted).
_PASSTHROUGH = {
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "required",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    VALIDATIONS,
}
_DROPPED = {"title", "examples", "deprecated", "readOnly", "writeOnly"}
# Output key order: what a reader of the YAML wants to see first.
_KEY_ORDER = [
    "description",
    "type",
    "format",
    "x-kubernetes-int-or-string",
    "anyOf",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "required",
    "properties",
    "additionalProperties",
    "items",
    VALIDATIONS,
]
INT_OR_STRING_BRANCHES = [{"type": "integer"}, {"type": "string"}]


class SchemaError(ValueError):
    """The model uses a construct that has no structural-schema equivalent."""


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, descriptions and CEL rules included."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs, model.__name__)


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline a `$ref`: the definition's keywords, overridden by the referring node's own.

    The referring node carries the field's description and field-level extras; CEL rules
    of both are kept (the model's first).
    """
    if "$ref" not in node:
        return node
    ref = node["$ref"]
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaError(f"{path}: unresolvable $ref {ref!r}")
    target = _resolve(copy.deepcopy(defs[ref[len(prefix) :]]), defs, path)
    siblings = {k: v for k, v in node.items() if k != "$ref"}
    return _merge(target, siblings)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **override}
    rules = [*base.get(VALIDATIONS, []), *override.get(VALIDATIONS, [])]
    if rules:
        merged[VALIDATIONS] = rules
    return merged


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(dict(node), defs, path)

    if "anyOf" in node:
        branches = [_resolve(b, defs, path) for b in node.pop("anyOf") if b != {"type": "null"}]
        if node.get("default", ...) is None:
            del node["default"]
        if len(branches) == 1:
            # Optional[X]: absent means None; a null sent by a client is pruned by the apiserver.
            node = _merge(branches[0], node)
        elif sorted(b.get("type", "") for b in branches) == ["integer", "string"]:
            extra = [k for b in branches for k in b if k not in ("type", "title")]
            if extra:
                raise SchemaError(
                    f"{path}: int-or-string branches cannot carry {extra}; validate with a CEL rule instead"
                )
            node["x-kubernetes-int-or-string"] = True
            node["anyOf"] = copy.deepcopy(INT_OR_STRING_BRANCHES)
        else:
            raise SchemaError(f"{path}: anyOf over {branches} is not structural")
    for keyword in ("oneOf", "allOf", "not", "$ref", "propertyNames", "prefixItems", "patternProperties"):
        if keyword in node:
            raise SchemaError(f"{path}: {keyword} has no structural-schema translation")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == SERVER_DEFAULT:
            out["default"] = value
        elif key == "description":
            out[key] = reflow(value)
        elif key == "default":
            # Server-side defaults only for scalars: an empty list or object default would
            # materialise in every stored object and in every diff.
            if SERVER_DEFAULT not in node and value is not None and not isinstance(value, list | dict):
                out["default"] = value
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "properties":
            out["properties"] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = _convert(value, defs, f"{path}{{}}")
            # `false` (extra="forbid") is dropped: pruning plus strict field validation reject unknown fields.
        elif key == VALIDATIONS:
            out[key] = [_ordered_rule(rule, path) for rule in value]
        elif key in _PASSTHROUGH or key == "anyOf":
            out[key] = value
        else:
            raise SchemaError(f"{path}: unsupported JSON Schema keyword {key!r}")
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return _ordered(out)


def reflow(text: str) -> str:
    """Docstring line breaks undone: `kubectl explain` wraps text itself, so a hard break reads mid-sentence.

    Paragraphs (blank-line separated) and lines starting a list item (`- `, `* `) keep their break.
    """
    paragraphs = []
    for paragraph in text.strip().split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            line = line.strip()
            if lines and not line.startswith(("- ", "* ")):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


_RULE_KEYS = ("rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf")


def _ordered_rule(rule: dict[str, Any], path: str) -> dict[str, Any]:
    unknown = set(rule) - set(_RULE_KEYS)
    if unknown or "rule" not in rule:
        raise SchemaError(f"{path}: malformed CEL rule {rule!r}")
    return {key: rule[key] for key in _RULE_KEYS if key in rule}


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return {key: node[key] for key in sorted(node, key=lambda k: (rank.get(k, len(rank)), k))}


# --------------------------------------------------------------------------------------
# Checks (used by the generator before writing, and by the tests)
# --------------------------------------------------------------------------------------


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with a kubectl-explain-like path (`spec.programs[].name`)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """What would make the apiserver reject the schema as non-structural, or make `kubectl explain` useless."""
    problems = []
    for path, node in walk(schema):
        where = path or "<root>"
        for keyword in ("$ref", "$defs", "oneOf", "allOf", "not", "title", "nullable"):
            if keyword in node:
                problems.append(f"{where}: has {keyword}")
        int_or_string = node.get("x-kubernetes-int-or-string")
        if int_or_string:
            if node.get("anyOf") != INT_OR_STRING_BRANCHES or "type" in node:
                problems.append(f"{where}: int-or-string must be exactly anyOf [integer, string] without type")
        else:
            if "anyOf" in node:
                problems.append(f"{where}: anyOf outside int-or-string")
            if "type" not in node and path != "metadata":
                problems.append(f"{where}: no type")
        if node.get("type") == "object" and "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: both properties and additionalProperties")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        if node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{where}: x-kubernetes-preserve-unknown-fields")
        is_property = path and not path.endswith(("[]", "{}"))
        if is_property and not node.get("description") and path not in ("apiVersion", "kind", "metadata"):
            problems.append(f"{where}: no description")
        for key in node.get("required", []):
            if key not in node.get("properties", {}):
                problems.append(f"{where}: required {key!r} is not a property")
        for rule in node.get(VALIDATIONS, []):
            if not rule.get("message") and not rule.get("messageExpression"):
                problems.append(f"{where}: CEL rule {rule['rule']!r} has no message")
        if node.get("x-kubernetes-list-type") == "map":
            item = node.get("items", {})
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in item.get("required", []) and "default" not in item.get("properties", {}).get(key, {}):
                    problems.append(f"{where}: list-map key {key!r} must be required or defaulted")
    return problems
