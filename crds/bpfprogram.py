"""BpfProgram: eBPF code (C source or a prebuilt CO-RE object) plus where to attach its functions, on a
selected set of nodes."""

from __future__ import annotations

import base64
import binascii
import re
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from beekeeper.crds.common import (
    AGE_COLUMN,
    BASE64_PATTERN,
    C_IDENTIFIER_PATTERN,
    NO_DOTDOT_RULE,
    ApiModel,
    CIdentifier,
    Condition,
    DnsSubdomain,
    LabelSelector,
    PrinterColumn,
    Resource,
    cel,
    cel_list,
    cel_str,
    check_absolute_path,
    condition_column,
    conditions_field,
    human_list,
    list_map,
    list_set,
    observed_generation_field,
    status_field,
    validations,
)
from beekeeper.crds.names import BPF_PROGRAM
from beekeeper.crds.program_types import BYTECODE_ONLY_TYPES, ProgramType

MAX_PROGRAMS = 64
MAX_METRICS = 64
MAX_INLINE_SOURCE = 256 * 1024
MAX_GLOBAL_DATA = 64
MAX_GLOBAL_VALUE = 4096
"""Bytes of one globalData value (base64 on the wire)."""
XDP_DEFAULT_PRIORITY = 50
"""Run priority of an XDP program that states none: libxdp's default, so programs of both interleave."""

# --------------------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------------------

CONFIGMAP_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap holding the C source (BpfProgram is cluster-scoped, so the namespace is explicit)."""

    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] = Field(
        description="Namespace of the ConfigMap."
    )
    name: DnsSubdomain = Field(description="Name of the ConfigMap.")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=CONFIGMAP_KEY_PATTERN)] = Field(
        description="Key within the ConfigMap's data whose value is the C source, e.g. `program.c`."
    )


class Source(ApiModel):
    """Where the eBPF C code comes from; it is compiled on each node by bcc against that node's kernel."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.inline) != has(self.configMapRef)",
                "exactly one of inline or configMapRef must be set",
            )
        )
    )

    inline: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_INLINE_SOURCE,
        description="The C source itself (bcc dialect: BPF_HASH, BPF_PERCPU_ARRAY, ...). Exclusive with configMapRef.",
    )
    config_map_ref: ConfigMapKeyRef | None = Field(
        None,
        description="Read the C source from a ConfigMap key; changes to the ConfigMap roll out like spec changes. "
        "Exclusive with inline.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if (self.inline is None) == (self.config_map_ref is None):
            raise ValueError("exactly one of inline or configMapRef must be set")
        return self


CFlag = Annotated[str, Field(min_length=2, max_length=256, pattern=r"^-[A-Za-z]")]


class BinaryConfigMapKeyRef(ConfigMapKeyRef):
    """A binaryData key of a ConfigMap holding a BPF ELF object."""

    key: Annotated[str, Field(min_length=1, max_length=253, pattern=CONFIGMAP_KEY_PATTERN)] = Field(
        description="Key within the ConfigMap's binaryData whose value is the ELF object, e.g. `program.o`."
    )


# registry[:port]/path[/path...] then a tag, a digest, or both (the digest wins).
IMAGE_PATTERN = (
    r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+"
    r"((:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?@sha256:[a-f0-9]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$"
)


class Bytecode(ApiModel):
    """A prebuilt BPF ELF object (clang -target bpf -g, CO-RE): loaded by libbpf on each node, which relocates
    its kernel struct accesses against that node's BTF, so nodes need no kernel headers and no compiler."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.configMapRef) != has(self.image)",
                "exactly one of configMapRef or image must be set",
            )
        )
    )

    config_map_ref: BinaryConfigMapKeyRef | None = Field(
        None,
        description="Read the object from a ConfigMap binaryData key (at most 256 KiB; strip DWARF with "
        "`llvm-strip -g`, or use an image for larger objects); changes roll out like spec changes. "
        "Exclusive with image.",
    )
    image: str | None = Field(
        None,
        max_length=512,
        pattern=IMAGE_PATTERN,
        description="OCI image holding the object, pinned by digest `registry/name@sha256:...`, or a tag resolved "
        "once. Exclusive with configMapRef.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Bytecode:
        if (self.config_map_ref is None) == (self.image is None):
            raise ValueError("exactly one of configMapRef or image must be set")
        return self


def _check_global_data(values: dict[str, str] | None) -> dict[str, str] | None:
    for name, value in (values or {}).items():
        if not re.match(C_IDENTIFIER_PATTERN, name):
            raise ValueError(f"globalData: key {name!r} must be a C identifier (the variable name)")
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError(f"globalData.{name}: not base64") from None
        if not raw or len(raw) > MAX_GLOBAL_VALUE:
            raise ValueError(f"globalData.{name}: must decode to 1 to {MAX_GLOBAL_VALUE} bytes")
    return values


GlobalData = Annotated[
    dict[str, Annotated[str, Field(min_length=4, max_length=5464, json_schema_extra={"pattern": BASE64_PATTERN})]]
    | None,
    AfterValidator(_check_global_data),
]

# --------------------------------------------------------------------------------------
# Programs and attach points
# --------------------------------------------------------------------------------------


class Direction(StrEnum):
    """Traffic direction at the hook, seen from the interface or cgroup."""

    INGRESS = "ingress"
    EGRESS = "egress"


class XdpMode(StrEnum):
    """native runs in the driver (fast, needs driver support); generic runs after skb allocation (works everywhere)."""

    NATIVE = "native"
    GENERIC = "generic"


class CgroupSockAddrAttachType(StrEnum):
    """The socket call a cgroup_sock_addr program intercepts (address family 4 or 6)."""

    CONNECT4 = "connect4"
    CONNECT6 = "connect6"
    BIND4 = "bind4"
    BIND6 = "bind6"
    SENDMSG4 = "sendmsg4"
    SENDMSG6 = "sendmsg6"
    RECVMSG4 = "recvmsg4"
    RECVMSG6 = "recvmsg6"
    GETPEERNAME4 = "getpeername4"
    GETPEERNAME6 = "getpeername6"
    GETSOCKNAME4 = "getsockname4"
    GETSOCKNAME6 = "getsockname6"


# Which attach fields each program type requires and which it may use; everything else is
# rejected so a misplaced field never silently does nothing. Keys are wire (camelCase) names.
ATTACH_FIELDS: dict[ProgramType, tuple[frozenset[str], frozenset[str]]] = {
    ProgramType.XDP: (frozenset({"interfaceSelector"}), frozenset({"xdpMode", "priority"})),
    ProgramType.TC: (frozenset({"interfaceSelector", "direction"}), frozenset({"priority"})),
    ProgramType.TRACEPOINT: (frozenset({"tracepoint"}), frozenset()),
    ProgramType.RAW_TRACEPOINT: (frozenset({"tracepoint"}), frozenset()),
    ProgramType.UPROBE: (frozenset({"binary", "symbol"}), frozenset({"offset", "pid"})),
    ProgramType.URETPROBE: (frozenset({"binary", "symbol"}), frozenset({"pid"})),
    ProgramType.KPROBE: (frozenset({"symbol"}), frozenset({"offset"})),
    ProgramType.KRETPROBE: (frozenset({"symbol"}), frozenset()),
    ProgramType.CGROUP_SKB: (frozenset({"cgroupPath", "direction"}), frozenset()),
    ProgramType.CGROUP_SOCK_ADDR: (frozenset({"cgroupPath", "attachType"}), frozenset()),
    ProgramType.FENTRY: (frozenset({"function"}), frozenset()),
    ProgramType.FEXIT: (frozenset({"function"}), frozenset()),
    ProgramType.LSM: (frozenset({"hook"}), frozenset()),
}
ATTACH_FIELD_NAMES = (
    "interfaceSelector",
    "direction",
    "xdpMode",
    "priority",
    "tracepoint",
    "binary",
    "symbol",
    "offset",
    "pid",
    "cgroupPath",
    "attachType",
    "function",
    "hook",
)


def _types_requiring(field: str) -> list[str]:
    return [t.value for t, (req, _) in ATTACH_FIELDS.items() if field in req]


def _types_allowing(field: str) -> list[str]:
    return [t.value for t, (req, opt) in ATTACH_FIELDS.items() if field in req | opt]


def _attach_rules() -> list[dict[str, str]]:
    """Per-field CEL rules derived from ATTACH_FIELDS: required-for and only-valid-for."""
    rules = []
    for field in ATTACH_FIELD_NAMES:
        allowed = _types_allowing(field)
        rules.append(
            cel(
                f"!has(self.{field}) || self.type in {cel_list(allowed)}",
                f"{field} is only valid for {human_list(allowed)} programs",
                field_path=f".{field}",
                reason="FieldValueForbidden",
            )
        )
        required = _types_requiring(field)
        if required:
            rules.append(
                cel(
                    f"!(self.type in {cel_list(required)}) || has(self.{field})",
                    f"{field} is required for {human_list(required)} programs",
                    field_path=f".{field}",
                    reason="FieldValueRequired",
                )
            )
    rules.append(
        cel(
            "self.type != 'tracepoint' || !has(self.tracepoint) || self.tracepoint.contains(':')",
            "tracepoint programs need tracepoint as category:name, e.g. raw_syscalls:sys_enter",
            field_path=".tracepoint",
        )
    )
    rules.append(
        cel(
            "self.type != 'raw_tracepoint' || !has(self.tracepoint) || !self.tracepoint.contains(':')",
            "raw_tracepoint programs need the bare tracepoint name, e.g. sys_enter",
            field_path=".tracepoint",
        )
    )
    return rules


INTERFACE_NAME_PATTERN = r"^[^\s/:]{1,15}$"
INTERFACE_GLOB_PATTERN = r"^[^\s/:]{1,64}$"
ABSOLUTE_PATH_PATTERN = r"^/"


class InterfaceSelector(ApiModel):
    """Network interfaces on the node to attach to: the named ones plus those matching the pattern."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.interfaces) || has(self.pattern)",
                "interfaceSelector needs interfaces or pattern",
            )
        )
    )

    interfaces: list[Annotated[str, Field(pattern=INTERFACE_NAME_PATTERN, max_length=15)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Interface names, e.g. eth0. Interfaces missing on a node are reported in status, not an error.",
        json_schema_extra=list_set(),
    )
    pattern: str | None = Field(
        None,
        pattern=INTERFACE_GLOB_PATTERN,
        max_length=64,
        description="Shell-style glob over interface names (`*`, `?`, `[...]`), e.g. `veth*`; interfaces that "
        "appear later are attached as they show up.",
    )

    @model_validator(mode="after")
    def _not_empty(self) -> InterfaceSelector:
        if not self.interfaces and self.pattern is None:
            raise ValueError("interfaceSelector needs interfaces or pattern")
        return self


class Program(ApiModel):
    """One function of the C source and the hook it attaches to; attach fields depend on type."""

    model_config = ConfigDict(json_schema_extra=validations(*_attach_rules()))

    name: CIdentifier = Field(
        description="Name of the C function in the source or object (unique within the list); for bytecode, the "
        "ELF section name is accepted too when exactly one program has it (e.g. xdp)."
    )
    type: ProgramType = Field(
        description="Kernel hook type; decides which attach fields are required and which are allowed."
    )
    interface_selector: InterfaceSelector | None = Field(
        None, description="xdp, tc: the network interfaces to attach to (required)."
    )
    direction: Direction | None = Field(None, description="tc, cgroup_skb: ingress or egress (required).")
    xdp_mode: XdpMode | None = Field(
        None, description="xdp: native (driver, default) or generic (skb, works on any interface)."
    )
    priority: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="tc, xdp: order among the programs of all BpfPrograms on one interface (and tc direction), "
        "lower runs first; tc default 1, xdp default 50 (libxdp's default run priority). Several XDP programs "
        "on one interface need a node whose status.capabilities.xdpMultiProgram is true.",
    )
    tracepoint: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9_]+(:[A-Za-z0-9_]+)?$",
        description="tracepoint: category:name, e.g. raw_syscalls:sys_enter; raw_tracepoint: the bare name, "
        "e.g. sys_enter (required).",
    )
    binary: str | None = Field(
        None,
        max_length=1024,
        pattern=ABSOLUTE_PATH_PATTERN,
        description="uprobe, uretprobe: absolute path of the executable or library on the node (required).",
        json_schema_extra=validations(NO_DOTDOT_RULE),
    )
    symbol: str | None = Field(
        None,
        max_length=256,
        pattern=r"^[A-Za-z_.$@][A-Za-z0-9_.$@]*$",
        description="uprobe, uretprobe: function symbol in binary; kprobe, kretprobe: kernel function (required).",
    )
    offset: int | None = Field(
        None, ge=0, description="uprobe, kprobe: byte offset from the start of symbol (default 0)."
    )
    pid: int | None = Field(
        None, ge=1, le=4194304, description="uprobe, uretprobe: only fire in this process (default: every process)."
    )
    cgroup_path: str | None = Field(
        None,
        max_length=1024,
        pattern=ABSOLUTE_PATH_PATTERN,
        description="cgroup_skb, cgroup_sock_addr: absolute path of a cgroup v2 directory, e.g. "
        "/sys/fs/cgroup/kubepods.slice (required).",
        json_schema_extra=validations(NO_DOTDOT_RULE),
    )
    attach_type: CgroupSockAddrAttachType | None = Field(
        None, description="cgroup_sock_addr: the socket call to intercept, e.g. connect4 (required)."
    )
    function: CIdentifier | None = Field(
        None,
        description="fentry, fexit: the kernel function to attach to, by its BTF name, e.g. do_unlinkat (required).",
    )
    hook: CIdentifier | None = Field(
        None, description="lsm: the LSM hook without the bpf_lsm_ prefix, e.g. file_open (required)."
    )

    @field_validator("binary", "cgroup_path")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        return None if value is None else check_absolute_path(value)

    @model_validator(mode="after")
    def _attach_fields_match_type(self) -> Program:
        problems = attach_field_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def effective_xdp_mode(self) -> XdpMode:
        return self.xdp_mode or XdpMode.NATIVE

    @property
    def effective_priority(self) -> int:
        return self.priority or (XDP_DEFAULT_PRIORITY if self.type == ProgramType.XDP else 1)


def attach_field_problems(program: Program) -> list[str]:
    """The same checks as the CEL rules on Program, as messages naming the field."""
    wire = program.model_dump(by_alias=True, exclude_none=True)
    present = {name for name in ATTACH_FIELD_NAMES if name in wire}
    required, optional = ATTACH_FIELDS[program.type]
    problems = []
    for field in ATTACH_FIELD_NAMES:
        if field in present and field not in required | optional:
            problems.append(f"{field}: {field} is only valid for {human_list(_types_allowing(field))} programs")
        if field in required and field not in present:
            problems.append(f"{field}: {field} is required for {human_list(_types_requiring(field))} programs")
    if program.tracepoint is not None:
        if program.type == ProgramType.TRACEPOINT and ":" not in program.tracepoint:
            problems.append("tracepoint: tracepoint programs need tracepoint as category:name")
        if program.type == ProgramType.RAW_TRACEPOINT and ":" in program.tracepoint:
            problems.append("tracepoint: raw_tracepoint programs need the bare tracepoint name")
    return problems


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

METRIC_NAME_PATTERN = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
# Prometheus label names; names starting with "__" are reserved for Prometheus itself.
METRIC_LABEL_PATTERN = r"^([a-zA-Z]|_[a-zA-Z0-9])[a-zA-Z0-9_]*$"
RESERVED_METRIC_PREFIX = "beekeeper_"
"""beekeeper's own families (beekeeper_bpf_program_*, beekeeper_policy_*, and future ones)."""
RESERVED_LABEL = "bpfprogram"
"""The label the node daemon adds to every series: the BpfProgram it comes from."""


def _not_reserved_label(value: str) -> str:
    if value == RESERVED_LABEL:
        raise ValueError(f"label {RESERVED_LABEL!r} is reserved: the node daemon adds it to every series")
    return value


def _not_reserved_name(value: str) -> str:
    if value.startswith(RESERVED_METRIC_PREFIX):
        raise ValueError(f"metric names starting with {RESERVED_METRIC_PREFIX!r} are reserved for beekeeper's own")
    return value


MetricLabel = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=METRIC_LABEL_PATTERN,
        json_schema_extra=validations(
            cel(
                f"self != '{RESERVED_LABEL}'",
                f"label {RESERVED_LABEL!r} is reserved: the node daemon adds it to every series",
            )
        ),
    ),
    AfterValidator(_not_reserved_label),
]


def metric_family(name: str) -> str:
    """The family a metric occupies on /metrics: a counter `x_total` is exposed as family `x`
    (sample `x_total`), so `x` and `x_total` of any type collide there. Two metrics with the
    same family would give /metrics a second HELP/TYPE line for one name."""
    return name.removesuffix("_total")


def _cel_family(m: str) -> str:
    """CEL twin of metric_family for the metric variable `m`."""
    return f"({m}.name.endsWith('_total') ? {m}.name.substring(0, {m}.name.size() - 6) : {m}.name)"


class MetricType(StrEnum):
    """Prometheus metric type of the exported series."""

    COUNTER = "counter"
    GAUGE = "gauge"


class KeyKind(StrEnum):
    """How to turn a map key into labels: one scalar (int, ipv4, string) or a C struct of fields."""

    INT = "int"
    IPV4 = "ipv4"
    STRING = "string"
    STRUCT = "struct"


class KeyFieldType(StrEnum):
    """C type of one struct field: unsigned integers, an IPv4 address (network byte order) or a char array."""

    U8 = "u8"
    U16 = "u16"
    U32 = "u32"
    U64 = "u64"
    IPV4 = "ipv4"
    STRING = "string"


class KeyField(ApiModel):
    """One field of a struct map key, exported as one label."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.size) || self.type == 'string'",
                "size is only valid for string fields",
                field_path=".size",
                reason="FieldValueForbidden",
            )
        )
    )

    name: CIdentifier = Field(description="Name of the struct member in the C source.")
    type: KeyFieldType = Field(description="C type of the member; ipv4 is a __be32 rendered as dotted quad.")
    size: int | None = Field(
        None, ge=1, le=256, description="string: size of the char array (default: from the map's key type)."
    )
    label: MetricLabel = Field(description="Prometheus label name the member's value is exported as.")

    @model_validator(mode="after")
    def _size_for_strings(self) -> KeyField:
        if self.size is not None and self.type != KeyFieldType.STRING:
            raise ValueError("size is only valid for string fields")
        return self


class MetricKey(ApiModel):
    """How the map key becomes Prometheus labels."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.kind != 'struct' || has(self.fields)",
                "struct keys need fields",
                field_path=".fields",
                reason="FieldValueRequired",
            ),
            cel(
                "self.kind == 'struct' || !has(self.fields)",
                "fields is only valid for struct keys",
                field_path=".fields",
                reason="FieldValueForbidden",
            ),
            cel(
                "self.kind == 'struct' || has(self.label)",
                "int, ipv4 and string keys need label",
                field_path=".label",
                reason="FieldValueRequired",
            ),
            cel(
                "self.kind != 'struct' || !has(self.label)",
                "label is not valid for struct keys: each field has its own label",
                field_path=".label",
                reason="FieldValueForbidden",
            ),
        )
    )

    kind: KeyKind = Field(description="int, ipv4 and string keys map to one label; struct keys to one label per field.")
    label: MetricLabel | None = Field(None, description="int, ipv4, string: the Prometheus label name of the key.")
    fields: list[KeyField] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="struct: the members of the key struct to export; labels are unique.",
        json_schema_extra=list_map("label"),
    )

    @model_validator(mode="after")
    def _shape_matches_kind(self) -> MetricKey:
        if self.kind == KeyKind.STRUCT:
            if not self.fields:
                raise ValueError("struct keys need fields")
            if self.label is not None:
                raise ValueError("label is not valid for struct keys: each field has its own label")
            _unique([f.label for f in self.fields], "label")
        else:
            if self.label is None:
                raise ValueError("int, ipv4 and string keys need label")
            if self.fields is not None:
                raise ValueError("fields is only valid for struct keys")
        return self


class Metric(ApiModel):
    """A BPF map exported as a Prometheus metric by the node daemon: one series per map key.

    The value is the map value read as an unsigned integer; per-CPU maps are summed over CPUs.
    """

    map_name: CIdentifier = Field(alias="map", description="Name of the map in the C source, e.g. `counts`.")
    name: Annotated[str, AfterValidator(_not_reserved_name)] = Field(
        min_length=1,
        max_length=200,
        pattern=METRIC_NAME_PATTERN,
        description="Prometheus metric name, e.g. syscalls_total (unique within the list, also without a _total "
        f"suffix; the prefix {RESERVED_METRIC_PREFIX} is reserved).",
        json_schema_extra=validations(
            cel(
                f"!self.startsWith('{RESERVED_METRIC_PREFIX}')",
                f"metric names starting with {RESERVED_METRIC_PREFIX!r} are reserved for beekeeper's own",
            )
        ),
    )
    type: MetricType = Field(description="counter (monotonic) or gauge.")
    help: str | None = Field(None, max_length=1024, description="Prometheus HELP text.")
    key: MetricKey = Field(description="How the map key is turned into labels.")


# --------------------------------------------------------------------------------------
# Spec, status, resource
# --------------------------------------------------------------------------------------


def _unique(items: list[str], what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"duplicate {what} {item!r}")
        seen.add(item)


class BpfProgramSpec(ApiModel):
    """Desired state: what code runs where."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.source) != has(self.bytecode)", "exactly one of source or bytecode must be set"),
            cel(
                "!has(self.cflags) || has(self.source)",
                "cflags is only valid with source (bytecode is already compiled)",
                field_path=".cflags",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.globalData) || has(self.bytecode)",
                "globalData is only valid with bytecode (with source, use cflags such as -DNAME=value)",
                field_path=".globalData",
                reason="FieldValueForbidden",
            ),
            cel(
                f"has(self.bytecode) || self.programs.all(p, !(p.type in {cel_list(BYTECODE_ONLY_TYPES)}))",
                "fentry, fexit and lsm programs need bytecode",
                field_path=".programs",
            ),
        )
    )

    node_selector: LabelSelector | None = Field(
        None, description="Nodes to run on, by node labels; empty or absent selects every node."
    )
    source: Source | None = Field(
        None, description="The eBPF C source, compiled on each node by bcc. Exclusive with bytecode."
    )
    bytecode: Bytecode | None = Field(
        None, description="A prebuilt CO-RE object, loaded on each node by libbpf. Exclusive with source."
    )
    cflags: list[CFlag] | None = Field(
        None,
        max_length=32,
        description="source: extra compiler flags for bcc, e.g. -DMAX_ENTRIES=1024; each must start with '-'.",
    )
    global_data: GlobalData = Field(
        None,
        max_length=MAX_GLOBAL_DATA,
        description="bytecode: initial values of the object's global variables (`const volatile` ones in .rodata, "
        "or .data), by variable name, as base64 of the exact bytes (little-endian on x86), as bpfman's globalData; "
        "one object then serves many configurations. A name the object lacks, or a wrong size, fails the load.",
        json_schema_extra=validations(
            cel(
                f"self.all(k, k.matches({cel_str(C_IDENTIFIER_PATTERN)}))",
                "globalData keys must be C identifiers (the variable names)",
            )
        ),
    )
    programs: list[Program] = Field(
        min_length=1,
        max_length=MAX_PROGRAMS,
        description="Functions of the source to load and where to attach each; names are unique.",
        json_schema_extra=list_map("name"),
    )
    metrics: list[Metric] | None = Field(
        None,
        max_length=MAX_METRICS,
        description="Maps exported as Prometheus metrics on each node daemon's /metrics; names are unique, also "
        "without a _total suffix (a counter x_total is exposed as family x).",
        json_schema_extra={
            **list_map("name"),
            **validations(
                cel(
                    f"self.all(m, self.exists_one(o, {_cel_family('o')} == {_cel_family('m')}))",
                    "metric names must differ after removing a _total suffix: a counter x_total is exposed as "
                    "family x, so x and x_total collide on /metrics",
                )
            ),
        },
    )

    @model_validator(mode="after")
    def _unique_names(self) -> BpfProgramSpec:
        if (self.source is None) == (self.bytecode is None):
            raise ValueError("exactly one of source or bytecode must be set")
        if self.cflags and self.bytecode is not None:
            raise ValueError("cflags: only valid with source (bytecode is already compiled)")
        if self.global_data and self.source is not None:
            raise ValueError("globalData: only valid with bytecode (with source, use cflags such as -DNAME=value)")
        if self.source is not None:
            needing = [p.name for p in self.programs if p.type in BYTECODE_ONLY_TYPES]
            if needing:
                raise ValueError(f"programs: {', '.join(needing)}: fentry, fexit and lsm programs need bytecode")
        _unique([p.name for p in self.programs], "program name")
        _unique([m.name for m in self.metrics or []], "metric name")
        _unique([metric_family(m.name) for m in self.metrics or []], "metric family (name without _total)")
        return self


class BpfProgramPhase(StrEnum):
    """Summary of the conditions for `kubectl get`."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    DELETING = "Deleting"


class NodeCounts(ApiModel):
    """How many nodes the program is meant for and how they are doing."""

    selected: int = Field(0, ge=0, description="Nodes matched by nodeSelector.")
    ready: int = Field(0, ge=0, description="Selected nodes with every program loaded and attached.")
    failed: int = Field(0, ge=0, description="Selected nodes where at least one program failed.")


class FailingNode(ApiModel):
    """Why one node is not running the program."""

    node: str = Field(max_length=253, description="Node name.")
    program: str | None = Field(
        None, max_length=64, description="Function that failed; absent when the whole source failed (e.g. compile)."
    )
    reason: str = Field(
        max_length=128,
        description=(
            "CamelCase cause: CompileError (also a compiler crash or out of memory), CompileTimeout, Quarantined "
            "(its build ended the node daemon twice in a row; retried when the spec changes), VerifierRejected, "
            "LoadFailed, FunctionNotFound, InterfaceNotFound, TracepointNotFound, AttachFailed, UnsupportedOnNode, ..."
        ),
    )
    message: str = Field(
        max_length=4096, description="Details: compiler error with line, verifier log excerpt, missing interface."
    )


class SignatureVerdict(StrEnum):
    """The cosign signature check of the image's digest under the cluster's verification policy."""

    VERIFIED = "Verified"
    UNSIGNED = "Unsigned"
    INVALID = "Invalid"
    NOT_CHECKED = "NotChecked"
    UNKNOWN = "Unknown"


class ImageStatus(ApiModel):
    """What the operator made of spec.bytecode.image: the digest every node runs, and its signature verdict."""

    reference: str = Field(max_length=512, description="spec.bytecode.image as resolved.")
    digest: str | None = Field(
        None,
        max_length=71,
        pattern=r"^sha256:[a-f0-9]{64}$",
        description="The manifest digest the nodes pull; a tag is resolved once and kept while the reference is "
        "unchanged.",
    )
    signature: SignatureVerdict = Field(
        description="Verified, Unsigned, Invalid, NotChecked (verification off) or Unknown (registry unreachable)."
    )
    message: str | None = Field(None, max_length=1024, description="Who signed it, or why it is not verified.")


class BpfProgramStatus(ApiModel):
    """Observed state aggregated by the operator from every selected node's BpfNodeState."""

    observed_generation: int = observed_generation_field()
    conditions: list[Condition] | None = conditions_field(
        ["Ready", "Progressing", "Degraded", "Reconciling", "Stalled"],
        "Reconciling and Stalled mirror Progressing and Degraded for kstatus (Flux, kpt).",
    )
    nodes: NodeCounts | None = Field(None, description="Node counts.")
    ready: str | None = Field(None, max_length=32, description="ready/selected nodes, e.g. 2/3 (for kubectl get).")
    phase: BpfProgramPhase | None = Field(None, description="Ready, Progressing, Degraded or Deleting.")
    failing_nodes: list[FailingNode] | None = Field(
        None, max_length=10, description="Up to 10 failing nodes with the reason; nodes.failed has the full count."
    )
    image: ImageStatus | None = Field(None, description="spec.bytecode.image: resolved digest and signature verdict.")
    warnings: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None,
        max_length=16,
        description="Up to 16 problems that do not stop the program from running, with the nodes reporting them, "
        "e.g. a metric whose map does not exist; the Degraded condition says MetricsNotExported.",
    )


class BpfProgram(Resource):
    """BpfProgram runs eBPF programs, compiled from C on each node, on the nodes its nodeSelector picks.

    Cluster-scoped because programs act on nodes, not on a namespace.
    """

    names: ClassVar = BPF_PROGRAM
    printer_columns: ClassVar = (
        PrinterColumn("Ready", ".status.ready", "string", "Nodes ready / nodes selected"),
        PrinterColumn("Status", ".status.phase", "string", "Ready, Progressing, Degraded or Deleting"),
        PrinterColumn("Failed", ".status.nodes.failed", "integer", "Selected nodes where a program failed", 1),
        condition_column("Reason", "Degraded", "Why it is degraded, e.g. CompileError", 1, "reason"),
        PrinterColumn("Types", ".spec.programs[*].type", "string", "Program types (xdp, tc, tracepoint, ...)", 1),
        AGE_COLUMN,
    )

    kind: Literal["BpfProgram"] = Field("BpfProgram", description="BpfProgram")
    spec: BpfProgramSpec = Field(description="What code runs where.")
    status: BpfProgramStatus | None = status_field("Aggregated state across nodes, written by the operator.")
