"""bpfman's eBPF bytecode image convention, read: labels naming programs and maps, one layer with the object.

An image built for bpfman (`FROM scratch`, `COPY prog.o /`, `LABEL io.ebpf.programs=...`)
loads in beekeeper unchanged:

- labels in the image config: `io.ebpf.programs` and `io.ebpf.maps`, JSON objects of name ->
  type (`{"xdp_stats":"xdp"}`); or the older single-program labels `io.ebpf.bpf_function_name`
  and `io.ebpf.program_type` (with `io.ebpf.program_name`, `io.ebpf.filename`, and the oldest
  `io.ebpf.section_name`);
- exactly one layer, tar+gzip (OCI or Docker media type) or plain tar, holding the ELF object;
  the file named by `io.ebpf.filename` if the label is there, else the only ELF file in it;
- an image index is resolved to the node's platform by the OCI client before this runs.

Not read: bpfman's custom media types (its spec leaves them TODO), zstd layers.
Pure functions over bytes: the client fetches and checks digests, this interprets.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from beekeeper.node_daemon.oci_client import InvalidImage, Manifest

PROGRAMS_LABEL = "io.ebpf.programs"
MAPS_LABEL = "io.ebpf.maps"
V1_FUNCTION_LABEL = "io.ebpf.bpf_function_name"
V1_TYPE_LABEL = "io.ebpf.program_type"
V1_NAME_LABEL = "io.ebpf.program_name"
V1_SECTION_LABEL = "io.ebpf.section_name"
FILENAME_LABEL = "io.ebpf.filename"

LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
)
MAX_CONFIG = 1024 * 1024
MAX_LAYER = 64 * 1024 * 1024
MAX_OBJECT = 64 * 1024 * 1024
"""Bound on the unpacked object (a gzip bomb stops here)."""

_ELF_MAGIC = b"\x7fELF"
_EM_BPF = 247


@dataclass(frozen=True)
class BytecodeLabels:
    """What the image says it holds: program name -> type, map name -> type (both as bpfman spells them)."""

    programs: Mapping[str, str] = field(default_factory=dict)
    maps: Mapping[str, str] = field(default_factory=dict)
    filename: str | None = None


@dataclass(frozen=True)
class BytecodeImage:
    """A pulled image: the ELF object and its labels, named by the manifest digest it came from."""

    digest: str
    elf: bytes
    labels: BytecodeLabels


def _json_label(labels: Mapping[str, Any], key: str) -> dict[str, str]:
    raw = labels.get(key)
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError as exc:
        raise InvalidImage(f"label {key} is not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidImage(f'label {key} must be a JSON object of name -> type, e.g. {{"xdp_stats":"xdp"}}')
    return value


def read_labels(config: bytes) -> BytecodeLabels:
    """The bytecode labels of an image config blob (current labels first, then bpfman's older ones)."""
    try:
        doc = json.loads(config)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidImage(f"image config is not JSON: {exc}") from None
    labels = ((doc.get("config") or {}).get("Labels") or {}) if isinstance(doc, dict) else {}
    if not isinstance(labels, dict):
        raise InvalidImage("image config Labels is not an object")
    filename = labels.get(FILENAME_LABEL) if isinstance(labels.get(FILENAME_LABEL), str) else None
    if PROGRAMS_LABEL in labels:
        maps = _json_label(labels, MAPS_LABEL) if MAPS_LABEL in labels else {}
        return BytecodeLabels(_json_label(labels, PROGRAMS_LABEL), maps, filename)
    function = labels.get(V1_FUNCTION_LABEL) or labels.get(V1_NAME_LABEL)
    if isinstance(function, str) and function:
        return BytecodeLabels({function: str(labels.get(V1_TYPE_LABEL) or "")}, {}, filename)
    return BytecodeLabels(filename=filename)  # an unlabelled image: the spec's program list alone decides


def bytecode_layer(manifest: Manifest) -> int:
    """Index of the layer holding the object: the manifest must have exactly one, of a tar media type."""
    if len(manifest.layers) != 1:
        raise InvalidImage(
            f"a bytecode image has exactly one layer (the object file); manifest {manifest.digest} "
            f"has {len(manifest.layers)}"
        )
    media_type = manifest.layers[0].media_type
    if media_type not in LAYER_TYPES:
        raise InvalidImage(f"layer media type {media_type!r} is not one of {', '.join(LAYER_TYPES)}")
    return 0


def _gunzip(data: bytes) -> bytes:
    if data[:2] != b"\x1f\x8b":
        return data
    inflater = zlib.decompressobj(wbits=31)
    out = inflater.decompress(data, MAX_OBJECT + 1024 * 1024)
    if inflater.unconsumed_tail:
        raise InvalidImage(f"layer unpacks to more than {MAX_OBJECT} bytes")
    return out


def check_elf(data: bytes, where: str) -> None:
    """A 64-bit eBPF ELF object in this host's byte order, as libbpf will accept it."""
    if data[:4] != _ELF_MAGIC:
        raise InvalidImage(f"{where} is not an ELF object")
    if data[4] != 2:
        raise InvalidImage(f"{where} is a 32-bit ELF object; eBPF objects are 64-bit")
    little = data[5] == 1
    if little != (sys.byteorder == "little"):
        order = "little" if little else "big"
        raise InvalidImage(f"{where} is {order}-endian, this node is {sys.byteorder}-endian (build it for this arch)")
    machine = int.from_bytes(data[18:20], sys.byteorder)
    if machine != _EM_BPF:
        raise InvalidImage(f"{where} is an ELF object for machine {machine}, not eBPF ({_EM_BPF})")


def _elf_files(tar: bytes, wanted: str | None) -> list[tuple[str, bytes]]:
    """(name, content) of the regular files of a tar that are ELF objects (only `wanted`, when given)."""
    found = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive.getmembers():
            if not member.isfile() or member.size > MAX_OBJECT:
                continue
            if wanted is not None and member.name.lstrip("./") != wanted:
                continue
            extracted = archive.extractfile(member)
            data = extracted.read() if extracted is not None else b""
            if data[:4] == _ELF_MAGIC or wanted is not None:
                found.append((member.name, data))
    return found


def extract_object(layer: bytes, filename: str | None) -> bytes:
    """The ELF object inside a layer: the named file, or the only ELF file of the tar."""
    wanted = filename.lstrip("./") if filename else None
    try:
        candidates = _elf_files(_gunzip(layer), wanted)
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise InvalidImage(f"layer is not a tar archive: {exc}") from None
    if wanted is not None and not candidates:
        raise InvalidImage(f"layer has no file {filename!r} (label {FILENAME_LABEL})")
    if len(candidates) != 1:
        names = ", ".join(name for name, _ in candidates) or "none"
        raise InvalidImage(f"layer must hold exactly one ELF object, found {len(candidates)} ({names})")
    name, data = candidates[0]
    check_elf(data, f"layer file {name}")
    return data


def missing_programs(labels: BytecodeLabels, wanted: list[str]) -> list[str]:
    """Programs the spec names that a labelled image says it does not hold (unlabelled images: none)."""
    if not labels.programs:
        return []
    return [name for name in wanted if name not in labels.programs]
