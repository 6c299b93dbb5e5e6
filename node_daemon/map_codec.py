"""Decoding raw BPF map keys and values into what a metrics exporter can label and count.

A map only knows byte sizes; the meaning of the bytes comes from the BpfProgram author
(the CRD's metric export names the key layout). Struct fields follow C's natural
alignment unless an explicit offset is given, so a layout can be copied from the C
struct definition field by field.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

_SCALARS: dict[str, tuple[str, int]] = {
    "u8": ("<B", 1),
    "u16": ("<H", 2),
    "u32": ("<I", 4),
    "u64": ("<Q", 8),
    "s8": ("<b", 1),
    "s16": ("<h", 2),
    "s32": ("<i", 4),
    "s64": ("<q", 8),
    "be16": (">H", 2),  # network byte order, e.g. ports as they sit in packet headers
    "be32": (">I", 4),
}
_FIXED = {"ipv4": 4, "ipv6": 16, "mac": 6}
_SIZED = ("string", "hex")
FIELD_KINDS = (*_SCALARS, *_FIXED, *_SIZED)


@dataclass(frozen=True)
class Field:
    """One member of a struct key: name, kind (see FIELD_KINDS), size for string/hex."""

    name: str
    kind: str
    size: int | None = None
    offset: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field {self.name!r}: kind must be one of {', '.join(FIELD_KINDS)}, not {self.kind!r}")
        if self.kind in _SIZED and not self.size:
            raise ValueError(f"field {self.name!r}: kind {self.kind} needs a size in bytes")

    @property
    def width(self) -> int:
        if self.kind in _SCALARS:
            return _SCALARS[self.kind][1]
        return _FIXED.get(self.kind) or self.size or 0

    @property
    def alignment(self) -> int:
        return self.width if self.kind in _SCALARS else (4 if self.kind == "ipv4" else 1)


@dataclass(frozen=True)
class Layout:
    """How to read a map key: a scalar kind spanning the whole key, or "struct" with fields.

    Scalar kinds: "uint" / "int" (little-endian, any size), "ipv4", "ipv6", "string"
    (NUL-terminated), "hex"; or any field kind.
    """

    kind: str = "uint"
    fields: tuple[Field, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        if self.kind == "struct" and not self.fields:
            raise ValueError("a struct layout needs fields")

    def decode(self, raw: bytes) -> object:
        if self.kind == "struct":
            return {f.name: _decode_field(f, raw) for f in self.fields_with_offsets()}
        if self.kind == "uint":
            return int.from_bytes(raw, "little")
        if self.kind == "int":
            return int.from_bytes(raw, "little", signed=True)
        return _decode(self.kind, raw)

    def fields_with_offsets(self) -> list[Field]:
        """Fields with offsets filled in by C natural alignment."""
        out: list[Field] = []
        pos = 0
        for f in self.fields:
            off = f.offset if f.offset is not None else -(-pos // f.alignment) * f.alignment
            out.append(Field(f.name, f.kind, f.size, off))
            pos = off + f.width
        return out


def _decode_field(f: Field, raw: bytes) -> object:
    assert f.offset is not None
    chunk = raw[f.offset : f.offset + f.width]
    if len(chunk) < f.width:
        raise ValueError(f"field {f.name!r} ends at byte {f.offset + f.width}, past the {len(raw)}-byte key")
    return _decode(f.kind, chunk)


def _decode(kind: str, raw: bytes) -> object:
    if kind in _SCALARS:
        return struct.unpack(_SCALARS[kind][0], raw[: _SCALARS[kind][1]])[0]
    if kind == "ipv4":
        return str(ipaddress.IPv4Address(raw[:4]))
    if kind == "ipv6":
        return str(ipaddress.IPv6Address(raw[:16]))
    if kind == "mac":
        return ":".join(f"{b:02x}" for b in raw[:6])
    if kind == "string":
        return raw.split(b"\0", 1)[0].decode(errors="replace")
    if kind == "hex":
        return raw.hex()
    raise ValueError(f"unknown layout kind {kind!r}")


def default_layout(key_size: int) -> Layout:
    return Layout("uint") if key_size in (1, 2, 4, 8) else Layout("hex")


def value_ints(raw: bytes, value_size: int, per_cpu_slots: int = 0) -> tuple[int, ...]:
    """A value as integer words; per-CPU values (each slot 8-byte aligned) summed per word."""
    word = 8 if value_size % 8 == 0 else 4 if value_size % 4 == 0 else 1
    code = {8: "Q", 4: "I", 1: "B"}[word]
    fmt = f"<{value_size // word}{code}"
    if not per_cpu_slots:
        return struct.unpack_from(fmt, raw)
    stride = -(-value_size // 8) * 8
    totals = [0] * (value_size // word)
    for cpu in range(per_cpu_slots):
        for i, v in enumerate(struct.unpack_from(fmt, raw, cpu * stride)):
            totals[i] += v
    return tuple(totals)
