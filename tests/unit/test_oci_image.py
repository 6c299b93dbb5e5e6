"""OCI references, manifests, bpfman's bytecode labels and layers, the node's object cache: pure logic."""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from beekeeper.node_daemon import bytecode_image
from beekeeper.node_daemon.bytecode_image import BytecodeImage, BytecodeLabels
from beekeeper.node_daemon.object_cache import ObjectCache
from beekeeper.node_daemon.oci_client import (
    Descriptor,
    ImageNotFound,
    InvalidImage,
    Manifest,
    parse_challenge,
    parse_manifest,
    select_platform,
    sha256_digest,
)
from beekeeper.node_daemon.oci_reference import BadReference, parse

DIGEST = "sha256:" + "ab" * 32


def elf(machine: int = 247, little: bool = sys.byteorder == "little", bits: int = 2) -> bytes:
    """The ELF header fields the checks read, then padding."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4] = bits
    header[5] = 1 if little else 2
    header[18:20] = machine.to_bytes(2, "little" if little else "big")
    return bytes(header) + b"\0" * 64


def layer(files: dict[str, bytes], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


def config(labels: dict[str, str]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": labels}}).encode()


# --- references --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("10.243.0.1:5000/bpf/xdp@" + DIGEST, "10.243.0.1:5000", "bpf/xdp", None, DIGEST),
        ("quay.io/bpfman-bytecode/xdp_pass:latest", "quay.io", "bpfman-bytecode/xdp_pass", "latest", None),
        ("localhost/x:v1@" + DIGEST, "localhost", "x", "v1", DIGEST),
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:1.0", "docker.io", "user/app", "1.0", None),
    ],
)
def test_references_parse_like_other_oci_clients(text, registry, repository, tag, digest) -> None:
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_reference_round_trips_and_pins() -> None:
    ref = parse("reg.example:5000/a/b:v2")
    assert str(ref) == "reg.example:5000/a/b:v2"
    assert str(ref.pinned(DIGEST)) == f"reg.example:5000/a/b:v2@{DIGEST}"
    assert parse("busybox").api_host == "registry-1.docker.io"


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("reg.io/a@sha256:abc", "digest"),
        ("reg.io/UPPER:v1", "repository"),
        ("reg.io/a:bad tag", "whitespace"),
        ("reg.io/a:-x", "tag"),
        ("", "1 to"),
    ],
)
def test_bad_references_name_the_part(text: str, part: str) -> None:
    with pytest.raises(BadReference, match=part):
        parse(text)


# --- manifests ---------------------------------------------------------------------------


def test_manifest_and_index_are_told_apart() -> None:
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 10},
        "layers": [{"mediaType": bytecode_image.LAYER_TYPES[0], "digest": DIGEST, "size": 20}],
    }
    parsed = parse_manifest(json.dumps(manifest).encode(), DIGEST)
    assert isinstance(parsed, Manifest) and parsed.layers[0].size == 20
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": DIGEST, "size": 5, "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:" + "cd" * 32, "size": 5, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    entries = parse_manifest(json.dumps(index).encode(), DIGEST)
    assert isinstance(entries, list)
    assert select_platform(entries, "linux", "amd64", "idx").digest == "sha256:" + "cd" * 32
    with pytest.raises(ImageNotFound, match="offers linux/arm64, linux/amd64"):
        select_platform(entries, "linux", "s390x", "idx")


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b'{"schemaVersion": 1}',
        b'{"schemaVersion": 2, "layers": [], "config": {"digest": "md5:x", "size": 1}}',
        b'{"schemaVersion": 2, "config": {"digest": "' + DIGEST.encode() + b'", "size": 1}}',
    ],
)
def test_malformed_manifests_are_invalid_images(doc: bytes) -> None:
    with pytest.raises(InvalidImage):
        parse_manifest(doc, DIGEST)


def test_bearer_challenge_is_read() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }


# --- bpfman's labels and layers ----------------------------------------------------------


def test_current_bpfman_labels() -> None:
    labels = bytecode_image.read_labels(
        config({"io.ebpf.programs": '{"xdp_stats":"xdp","tc_stats":"tc"}', "io.ebpf.maps": '{"counts":"hash"}'})
    )
    assert labels.programs == {"xdp_stats": "xdp", "tc_stats": "tc"}
    assert labels.maps == {"counts": "hash"}
    assert bytecode_image.missing_programs(labels, ["xdp_stats", "other"]) == ["other"]


def test_older_bpfman_labels() -> None:
    labels = bytecode_image.read_labels(
        config(
            {
                "io.ebpf.program_name": "xdp_counter",
                "io.ebpf.bpf_function_name": "xdp_stats",
                "io.ebpf.program_type": "xdp",
                "io.ebpf.filename": "bpf_x86_bpfel.o",
            }
        )
    )
    assert labels.programs == {"xdp_stats": "xdp"}
    assert labels.filename == "bpf_x86_bpfel.o"


def test_unlabelled_image_lets_the_spec_decide() -> None:
    labels = bytecode_image.read_labels(config({}))
    assert labels.programs == {}
    assert bytecode_image.missing_programs(labels, ["anything"]) == []


@pytest.mark.parametrize("value", ["not-json", '["a"]', '{"a": 1}'])
def test_malformed_program_label_is_named(value: str) -> None:
    with pytest.raises(InvalidImage, match=r"io\.ebpf\.programs"):
        bytecode_image.read_labels(config({"io.ebpf.programs": value}))


@pytest.mark.parametrize("compress", [True, False])
def test_the_object_is_found_in_the_layer(compress: bool) -> None:
    obj = elf()
    assert bytecode_image.extract_object(layer({"prog.o": obj}, compress), None) == obj
    both = layer({"README": b"text", "./a.o": obj, "b.o": obj + b"x"})
    assert bytecode_image.extract_object(both, "b.o") == obj + b"x"
    with pytest.raises(InvalidImage, match="exactly one ELF object, found 2"):
        bytecode_image.extract_object(both, None)
    with pytest.raises(InvalidImage, match=r"no file 'c\.o'"):
        bytecode_image.extract_object(both, "c.o")


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        (elf(machine=62), "machine 62, not eBPF"),
        (elf(little=sys.byteorder != "little"), "endian"),
        (elf(bits=1), "32-bit"),
    ],
)
def test_objects_libbpf_would_refuse_are_refused_here(obj: bytes, words: str) -> None:
    with pytest.raises(InvalidImage, match=words):
        bytecode_image.extract_object(layer({"prog.o": obj}), None)


def test_layer_count_and_type() -> None:
    one = Descriptor(bytecode_image.LAYER_TYPES[1], DIGEST, 1)
    manifest = Manifest(DIGEST, "m", one, (one,), {}, b"")
    assert bytecode_image.bytecode_layer(manifest) == 0
    with pytest.raises(InvalidImage, match="exactly one layer"):
        bytecode_image.bytecode_layer(Manifest(DIGEST, "m", one, (one, one), {}, b""))
    zstd = Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", DIGEST, 1)
    with pytest.raises(InvalidImage, match="zstd"):
        bytecode_image.bytecode_layer(Manifest(DIGEST, "m", one, (zstd,), {}, b""))


# --- the object cache --------------------------------------------------------------------


def image(n: int, size: int = 100) -> BytecodeImage:
    data = elf() + bytes([n]) * size
    return BytecodeImage(sha256_digest(data), data, BytecodeLabels({"p": "xdp"}, {"m": "hash"}, None))


def test_cache_round_trip_survives_a_new_instance(tmp_path: Path) -> None:
    img = image(1)
    ObjectCache(tmp_path).put(img)
    again = ObjectCache(tmp_path).get(img.digest)
    assert again == img
    assert ObjectCache(tmp_path).get(image(2).digest) is None


def test_cache_drops_a_tampered_entry(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    img = image(1)
    cache.put(img)
    (tmp_path / img.digest.split(":")[1] / "object.o").write_bytes(b"evil")
    assert cache.get(img.digest) is None
    assert cache.digests() == []


def test_cache_prunes_least_recently_used_but_keeps_what_is_in_use(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    images = [image(n, 400) for n in range(4)]
    for age, img in enumerate(images):
        cache.put(img)
        entry = tmp_path / img.digest.split(":")[1]
        os.utime(entry, (1000 + age, 1000 + age))
    sizes = [sum(f.stat().st_size for f in (tmp_path / i.digest.split(":")[1]).iterdir()) for i in images]
    # Room for exactly the three that stay: entries differ in size by a few bytes (meta.json holds
    # the time of the pull), so three times one entry's size may not fit them.
    cache.max_bytes = sizes[0] + sizes[2] + sizes[3]
    removed = cache.prune(keep=[images[0].digest])
    assert removed == [images[1].digest]
    assert set(cache.digests()) == {images[0].digest, images[2].digest, images[3].digest}


def test_cache_removes_interrupted_writes(tmp_path: Path) -> None:
    (tmp_path / ".tmp-x-1").mkdir()
    ObjectCache(tmp_path)
    assert not (tmp_path / ".tmp-x-1").exists()
