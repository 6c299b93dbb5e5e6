"""Building blocks shared by every beekeeper resource.

The base model, CEL/list-type helpers, label selectors, conditions and loose object
metadata. CEL rules are declared next to the model they constrain (through
`json_schema_extra`) so the generator stays a mechanical translator; the same rules are
mirrored in cheap pydantic validators so unit tests catch bad input without a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, model_validator
from pydantic.alias_generators import to_camel

from beekeeper.crds.names import ResourceNames
from beekeeper.crds.schema import SERVER_DEFAULT

# --------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, snake_case in Python.

    Unknown fields are rejected, mirroring the apiserver's strict field validation, so a
    typo in an example or a test fixture fails in unit tests instead of being pruned.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------------------
# Schema helpers (CEL rules, list types)
# --------------------------------------------------------------------------------------

CelReason = Literal["FieldValueInvalid", "FieldValueRequired", "FieldValueForbidden", "FieldValueDuplicate"]


def cel(
    rule: str,
    message: str | None = None,
    *,
    message_expression: str | None = None,
    field_path: str | None = None,
    reason: CelReason | None = None,
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; `field_path` makes the error name the field itself."""
    if not message and not message_expression:
        raise ValueError(f"CEL rule {rule!r} needs a message: users see it at kubectl apply")
    entry = {"rule": rule}
    if message:
        entry["message"] = message
    if message_expression:
        entry["messageExpression"] = message_expression
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


# Paths start with "/", so every ".." segment is "/../" or a trailing "/.."; contains() is far
# cheaper than matches() in the CEL cost estimate, which counts for the nested BpfNodeState copy.
NO_DOTDOT_RULE = cel("!self.contains('/../') && !self.endsWith('/..')", "must not contain '..' path segments")


def check_absolute_path(value: str) -> str:
    """An absolute path without '..' segments (what NO_DOTDOT_RULE and an absolute-path rule check in the
    apiserver), for the models; the error pydantic raises names the field it is on."""
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path (start with /)")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} must not contain '..' path segments")
    return value


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules for a model or a field."""
    return {"x-kubernetes-validations": list(rules)}


def list_map(*keys: str) -> dict[str, Any]:
    """`json_schema_extra` for a list whose items are unique by `keys` (server-side apply merges by key)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


def atomic_list() -> dict[str, Any]:
    """`json_schema_extra` for a list one writer replaces whole: unique keys are checked by the model.

    For a list-map the apiserver records every item's key in managedFields: a 300-address
    ipcache made a 15 KB slice 38 KB as stored and doubled the apiserver's CPU per write.
    """
    return {"x-kubernetes-list-type": "atomic"}


def list_set() -> dict[str, Any]:
    """`json_schema_extra` for a list of unique scalars."""
    return {"x-kubernetes-list-type": "set"}


def cel_str(value: str) -> str:
    """A CEL raw string literal (no escape processing, so regexes stay readable)."""
    if "'" in value:
        raise ValueError(f"cannot embed {value!r} in a CEL raw string")
    return f"r'{value}'"


def cel_list(values: Iterable[str]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def human_list(values: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`: for messages that must read well at kubectl apply."""
    values = list(values)
    if len(values) <= 1:
        return "".join(values)
    return ", ".join(values[:-1]) + " and " + values[-1]


# --------------------------------------------------------------------------------------
# Kubernetes name syntax
# --------------------------------------------------------------------------------------

# Character classes instead of backslash escapes: the same text is a valid Go RE2, Rust
# regex (pydantic) and Python `re` pattern, and embeds in CEL without escaping.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}([.]{_DNS_LABEL})*"
_QUALIFIED_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"

DNS_LABEL_PATTERN = rf"^{_DNS_LABEL}$"
DNS_SUBDOMAIN_PATTERN = rf"^{_DNS_SUBDOMAIN}$"
LABEL_KEY_PATTERN = rf"^({_DNS_SUBDOMAIN}/)?{_QUALIFIED_NAME}$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
LABEL_KEY_MAX_LENGTH = 317  # 253 (DNS subdomain prefix) + "/" + 63 (name)
LABEL_KEY_PREFIX_MAX_LENGTH = 253
C_IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Standard base64, padded. Not `format: byte`: the apiserver's CEL reads such a field as URL-safe
base64 and fails every rule of its object on a `/` or `+` (seen on 1.34)."""

_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)


def check_label_key(key: str) -> str:
    """Label keys: an optional DNS-subdomain prefix and `/`, then a qualified name of at most 63 characters."""
    if len(key) > LABEL_KEY_MAX_LENGTH or not _LABEL_KEY_RE.match(key):
        raise ValueError(f"invalid label key {key!r}: want [prefix/]name, name like 'app' or 'app.kubernetes.io/name'")
    if key.find("/") > LABEL_KEY_PREFIX_MAX_LENGTH:
        raise ValueError(f"invalid label key {key!r}: the prefix is longer than 253 characters")
    return key


def check_label_value(value: str) -> str:
    """Label values: empty, or up to 63 alphanumerics, '-', '_' and '.', starting and ending alphanumeric."""
    if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
        raise ValueError(f"invalid label value {value!r}")
    return value


LabelKey = Annotated[
    str,
    Field(max_length=LABEL_KEY_MAX_LENGTH, pattern=LABEL_KEY_PATTERN),
    AfterValidator(check_label_key),
]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
CIdentifier = Annotated[str, Field(min_length=1, max_length=64, pattern=C_IDENTIFIER_PATTERN)]


def _check_label_map(labels: dict[str, str] | None) -> dict[str, str] | None:
    for key in labels or {}:
        check_label_key(key)
    return labels


# --------------------------------------------------------------------------------------
# Label selectors
# --------------------------------------------------------------------------------------


class SelectorOperator(StrEnum):
    """How a selector requirement relates a label key to its values."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(ApiModel):
    """One set-based requirement; all requirements of a selector must hold (AND)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
                "values must be non-empty when operator is In or NotIn",
                field_path=".values",
                reason="FieldValueRequired",
            ),
            cel(
                "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
                "values must be empty when operator is Exists or DoesNotExist",
                field_path=".values",
                reason="FieldValueForbidden",
            ),
        )
    )

    key: LabelKey = Field(description="The label key the requirement applies to, e.g. `app.kubernetes.io/name`.")
    operator: SelectorOperator = Field(
        description="In and NotIn compare the label's value with `values`; Exists and DoesNotExist test only the key."
    )
    values: list[LabelValue] | None = Field(
        None,
        max_length=64,
        description="Label values for In and NotIn (at least one); must be empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        if self.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN) and not self.values:
            raise ValueError("values must be non-empty when operator is In or NotIn")
        if self.operator in (SelectorOperator.EXISTS, SelectorOperator.DOES_NOT_EXIST) and self.values:
            raise ValueError("values must be empty when operator is Exists or DoesNotExist")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        match self.operator:
            case SelectorOperator.IN:
                return labels.get(self.key) in (self.values or [])
            case SelectorOperator.NOT_IN:
                return labels.get(self.key) not in (self.values or [])
            case SelectorOperator.EXISTS:
                return self.key in labels
            case SelectorOperator.DOES_NOT_EXIST:
                return self.key not in labels
        raise AssertionError(self.operator)  # pragma: no cover


class LabelSelector(ApiModel):
    """A Kubernetes label selector (same meaning as metav1.LabelSelector): an empty selector matches everything."""

    match_labels: Annotated[dict[str, LabelValue] | None, AfterValidator(_check_label_map)] = Field(
        None,
        max_length=64,
        description="Labels that must all be present with exactly these values.",
        json_schema_extra={
            "maxProperties": 64,
            **validations(
                cel(
                    f"self.all(k, k.size() <= {LABEL_KEY_MAX_LENGTH} && k.matches({cel_str(LABEL_KEY_PATTERN)})"
                    f" && k.indexOf('/') <= {LABEL_KEY_PREFIX_MAX_LENGTH})",
                    "label keys must be [prefix/]name: a DNS subdomain prefix of at most 253 characters, "
                    "a name of at most 63 alphanumerics, '-', '_' or '.' starting and ending alphanumeric",
                )
            ),
        },
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=32, description="Set-based requirements that must all hold."
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a label set satisfies the selector (matchLabels AND matchExpressions)."""
        if any(labels.get(k) != v for k, v in (self.match_labels or {}).items()):
            return False
        return all(req.matches(labels) for req in self.match_expressions or [])

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


# --------------------------------------------------------------------------------------
# Time and conditions
# --------------------------------------------------------------------------------------


def _format_time(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Time = Annotated[datetime, PlainSerializer(_format_time, return_type=str, when_used="json")]
"""A timestamp serialised like metav1.Time: RFC 3339, UTC, whole seconds."""


def now() -> datetime:
    """The current time at metav1.Time precision."""
    return datetime.now(UTC).replace(microsecond=0)


def timestamp() -> str:
    """The current time as written on the wire (metav1.Time)."""
    return _format_time(now())


class ConditionStatus(StrEnum):
    """Whether a condition holds."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


CONDITION_TYPE_PATTERN = rf"^({_DNS_SUBDOMAIN}/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(ApiModel):
    """One aspect of the object's state, in the standard metav1.Condition shape that kstatus, Flux and Argo CD read."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="CamelCase condition type, e.g. Ready; unique within the list.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from; older means stale."
    )
    last_transition_time: Time = Field(
        description="When status last changed (not when the condition was last checked)."
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="CamelCase machine-readable cause of the last transition.",
    )
    message: str = Field(max_length=32768, description="Human-readable details; may be empty.")


def set_condition(conditions: Sequence[Condition], new: Condition) -> list[Condition]:
    """Insert or replace a condition by type, keeping lastTransitionTime when the status did not change.

    The preserved timestamp is what lets readers tell "Ready for an hour" from "flapping".
    """
    result: list[Condition] = []
    replaced = False
    for cond in conditions:
        if cond.type != new.type:
            result.append(cond)
            continue
        replaced = True
        if cond.status == new.status:
            new = new.model_copy(update={"last_transition_time": cond.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    return result


def find_condition(conditions: Sequence[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.type == type_), None)


def conditions_field(types: Sequence[str], note: str = "") -> Any:
    """The standard `conditions` field: a list keyed by type, so server-side apply merges per condition."""
    description = f"Standard conditions ({human_list(list(types))}), each with observedGeneration."
    return Field(
        None,
        max_length=16,
        description=f"{description} {note}".strip(),
        json_schema_extra=list_map("type"),
    )


# --------------------------------------------------------------------------------------
# Object metadata and resources
# --------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The subset of metav1.ObjectMeta beekeeper reads; everything else is kept as-is."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True, extra="allow"
    )

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None
    owner_references: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class PrinterColumn:
    """An `additionalPrinterColumns` entry: what `kubectl get` shows."""

    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


def status_field(description: str) -> Any:
    """A resource's `status`, stored as `{observedGeneration: 0}` from creation on (the schema defaults both).

    Without it a new object has no status until the operator writes one, and kstatus (Flux,
    kpt) then computes Current for it: a broken object would pass a health check while the
    operator is down or has not got to it yet. With generation 1 and observedGeneration 0
    it reads InProgress, as does the Argo CD health script.
    """
    return Field(None, description=description, json_schema_extra={SERVER_DEFAULT: {}})


def observed_generation_field() -> Any:
    """`status.observedGeneration`, defaulted to 0 by the apiserver: "not looked at yet" (see status_field)."""
    return Field(
        0, ge=0, description="metadata.generation this status describes; 0 until the operator first looked at it."
    )


def condition_column(
    name: str, type_: str, description: str, priority: int = 0, field: str = "status"
) -> PrinterColumn:
    """A column showing one field of one condition: its status (True/False/Unknown) or its reason."""
    return PrinterColumn(name, f'.status.conditions[?(@.type=="{type_}")].{field}', "string", description, priority)


class Resource(ApiModel):
    """A top-level custom resource: apiVersion, kind, metadata, spec, status.

    Subclasses declare `names` and `printer_columns` (what the CRD is called and how
    `kubectl get` shows it); CEL rules that need metadata go into their model_config.
    """

    names: ClassVar[ResourceNames]
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (AGE_COLUMN,)
    selectable_fields: ClassVar[tuple[str, ...]] = ()
    """JSON paths clients may filter on with a field selector (e.g. a daemon watching only its node's objects)."""

    api_version: Literal["beekeeper.dev/v1alpha1"] = Field(
        "beekeeper.dev/v1alpha1", description="beekeeper.dev/v1alpha1"
    )
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Any:
        """Parse an object as the apiserver returns it (extra metadata kept, status optional)."""
        return cls.model_validate(obj)
