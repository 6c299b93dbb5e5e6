"""RuntimeSecurityPolicy: what may be executed inside selected pods, decided in the kernel per exec.

A rule matches the file the kernel actually executes (its inode, resolved inside each
selected container's root), so symlinks, relative paths, PATH lookups and hard links name
the same file. Precedence within a pod: an exact `paths` entry wins over a `pathPrefixes`
entry, the nearest enclosing prefix wins over farther ones, and `defaultAction` applies to
everything no rule matches (the allow-list posture). Between policies selecting the same
pod the strongest verdict wins: Block over Audit over Allow.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from beekeeper.crds.common import (
    AGE_COLUMN,
    NO_DOTDOT_RULE,
    ApiModel,
    Condition,
    DnsLabel,
    LabelSelector,
    PrinterColumn,
    Resource,
    cel,
    check_absolute_path,
    condition_column,
    conditions_field,
    list_map,
    list_set,
    observed_generation_field,
    status_field,
    validations,
)
from beekeeper.crds.names import RUNTIME_SECURITY_POLICY

MAX_RULES = 16
MAX_PATHS = 16
MAX_CONTAINERS = 16
PATH_MAX_LENGTH = 256
"""Short enough to keep the cross-rule conflict check cheap in the apiserver's CEL cost estimate."""


def _check_path(value: str, prefix: bool) -> str:
    check_absolute_path(value)
    if prefix and not value.endswith("/"):
        raise ValueError(f"{value!r} must end with / (a directory prefix, e.g. /tmp/)")
    if not prefix and value.endswith("/"):
        raise ValueError(f"{value!r} must name a file, not end with /")
    return value


_ABSOLUTE = cel("self.startsWith('/')", "must be an absolute path (start with /)")
ExecPath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=PATH_MAX_LENGTH,
        json_schema_extra=validations(
            _ABSOLUTE, NO_DOTDOT_RULE, cel("!self.endsWith('/')", "must name a file, not end with /")
        ),
    ),
    AfterValidator(lambda v: _check_path(v, prefix=False)),
]
PathPrefix = Annotated[
    str,
    Field(
        min_length=2,
        max_length=PATH_MAX_LENGTH,
        json_schema_extra=validations(
            _ABSOLUTE, NO_DOTDOT_RULE, cel("self.endsWith('/')", "must end with / (a directory prefix, e.g. /tmp/)")
        ),
    ),
    AfterValidator(lambda v: _check_path(v, prefix=True)),
]


class RuleAction(StrEnum):
    """What happens when a rule matches."""

    BLOCK = "Block"
    AUDIT = "Audit"
    ALLOW = "Allow"


class DefaultAction(StrEnum):
    """What happens to an exec no rule matches (the allow-list posture)."""

    BLOCK = "Block"
    AUDIT = "Audit"


class PolicyMode(StrEnum):
    """Enforce applies the actions; Audit reports what Block would have stopped and stops nothing."""

    ENFORCE = "Enforce"
    AUDIT = "Audit"


class ExecMatch(ApiModel):
    """Programs by the file executed, resolved inside the container (symlinks and hard links included)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.paths) && size(self.paths) > 0) || (has(self.pathPrefixes) && size(self.pathPrefixes) > 0)",
                "exec needs paths or pathPrefixes",
                reason="FieldValueRequired",
            )
        )
    )

    paths: list[ExecPath] | None = Field(
        None,
        max_length=MAX_PATHS,
        description="Absolute paths of files inside the container, e.g. /bin/sh; a link to one is the same file.",
        json_schema_extra=list_set(),
    )
    path_prefixes: list[PathPrefix] | None = Field(
        None,
        max_length=MAX_PATHS,
        description="Directories inside the container, ending with /, e.g. /tmp/: any file beneath them.",
        json_schema_extra=list_set(),
    )

    @model_validator(mode="after")
    def _something(self) -> ExecMatch:
        if not self.paths and not self.path_prefixes:
            raise ValueError("exec needs paths or pathPrefixes")
        for field, values in (("paths", self.paths), ("pathPrefixes", self.path_prefixes)):
            if len(set(values or [])) != len(values or []):
                raise ValueError(f"{field} must not repeat an entry")
        return self


class RuntimeRule(ApiModel):
    """One named rule: what it matches and what happens then."""

    name: DnsLabel = Field(description="Unique within the policy; shown in events and metrics.")
    exec: ExecMatch = Field(description="The programs this rule is about.")
    action: RuleAction = Field(
        description="Block: the program never runs (the caller sees the exec fail or the process killed); "
        "Audit: it runs and is reported; Allow: it runs unreported (exempt from defaultAction)."
    )


def _conflicts(rules: list[RuntimeRule]) -> str | None:
    for i, a in enumerate(rules):
        for b in rules[i + 1 :]:
            if a.action == b.action:
                continue
            for field, left, right in (
                ("paths", a.exec.paths, b.exec.paths),
                ("pathPrefixes", a.exec.path_prefixes, b.exec.path_prefixes),
            ):
                same = sorted(set(left or []) & set(right or []))
                if same:
                    return f"rules {a.name} and {b.name} give {same[0]} ({field}) different actions"
    return None


_CONFLICT_RULE = cel(
    "self.rules.all(a, self.rules.all(b, a.name == b.name || a.action == b.action || ("
    "(!has(a.exec.paths) || !has(b.exec.paths) || !a.exec.paths.exists(p, p in b.exec.paths)) && "
    "(!has(a.exec.pathPrefixes) || !has(b.exec.pathPrefixes) || "
    "!a.exec.pathPrefixes.exists(p, p in b.exec.pathPrefixes)))))",
    "two rules give the same path or prefix different actions",
    field_path=".rules",
)


class RuntimeSecurityPolicySpec(ApiModel):
    """Which pods (and containers) the policy selects and what may run in them."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            _CONFLICT_RULE,
            cel(
                "has(self.defaultAction) || !self.rules.exists(r, r.action == 'Allow')",
                "Allow rules need spec.defaultAction (what happens to everything else)",
                field_path=".defaultAction",
                reason="FieldValueRequired",
            ),
        )
    )

    pod_selector: LabelSelector = Field(
        description="Pods in this namespace the policy applies to; {} selects every pod in the namespace."
    )
    containers: list[DnsLabel] | None = Field(
        None,
        max_length=MAX_CONTAINERS,
        description="Only these containers of the selected pods (by name); absent means all of them.",
        json_schema_extra=list_set(),
    )
    mode: PolicyMode = Field(
        PolicyMode.ENFORCE,
        description="Enforce (default) applies the actions; Audit reports every match and blocks nothing.",
    )
    rules: list[RuntimeRule] = Field(
        min_length=1,
        max_length=MAX_RULES,
        description="Named rules; an exact path wins over a prefix, the nearest prefix over farther ones.",
        json_schema_extra=list_map("name"),
    )
    default_action: DefaultAction | None = Field(
        None,
        description="For an allow-list: Block or Audit every exec no rule matches; absent leaves them alone.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RuntimeSecurityPolicySpec:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rules: rule names must be unique")
        if len(set(self.containers or [])) != len(self.containers or []):
            raise ValueError("containers must not repeat a name")
        conflict = _conflicts(self.rules)
        if conflict:
            raise ValueError(f"rules: {conflict}")
        if self.default_action is None and any(r.action == RuleAction.ALLOW for r in self.rules):
            raise ValueError("defaultAction: Allow rules need spec.defaultAction (what happens to everything else)")
        return self


class RuntimeSecurityPolicyStatus(ApiModel):
    """Observed state, written by the operator from the nodes' reports."""

    observed_generation: int = observed_generation_field()
    conditions: list[Condition] | None = conditions_field(["Valid", "Ready", "Reconciling", "Stalled"])
    selected_pods: int | None = Field(None, ge=0, description="Running pods selected by podSelector.")
    nodes_enforcing: int | None = Field(
        None, ge=0, description="Nodes whose kernel enforces the current generation for every selected local pod."
    )
    matches: int | None = Field(None, ge=0, description="Execs matched on all nodes since their daemons started.")
    hooks: dict[str, int] | None = Field(
        None,
        description="Kernel hook in force -> number of nodes using it: lsm (exec fails with EPERM) or "
        "tracepoint (the process is killed before the program's first instruction).",
    )


class RuntimeSecurityPolicy(Resource):
    """RuntimeSecurityPolicy blocks or audits programs executed in selected pods, enforced in each node's kernel."""

    names: ClassVar = RUNTIME_SECURITY_POLICY
    printer_columns: ClassVar = (
        PrinterColumn("Mode", ".spec.mode", "string", "Enforce or Audit"),
        condition_column("Valid", "Valid", "Whether the policy was accepted"),
        condition_column("Ready", "Ready", "Whether every node enforces the current generation"),
        PrinterColumn("Pods", ".status.selectedPods", "integer", "Pods selected"),
        PrinterColumn("Nodes", ".status.nodesEnforcing", "integer", "Nodes enforcing the policy"),
        PrinterColumn("Matches", ".status.matches", "integer", "Execs matched"),
        AGE_COLUMN,
    )

    kind: Literal["RuntimeSecurityPolicy"] = Field("RuntimeSecurityPolicy", description="RuntimeSecurityPolicy")
    spec: RuntimeSecurityPolicySpec = Field(description="Selected pods and the rules for what runs in them.")
    status: RuntimeSecurityPolicyStatus | None = status_field("Observed state, written by the operator.")
