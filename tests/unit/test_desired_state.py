"""Desired-state computation: which node runs what, and when nothing changes."""

from __future__ import annotations

import base64
import copy
import hashlib

from beekeeper.crds.bpfprogram import SignatureVerdict as Verdict
from beekeeper.crds.nodestate import MAX_BYTECODE
from beekeeper.operator.desired_state import node_programs, place
from beekeeper.operator.image_resolver import Resolution

SOURCE = "TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return 0; }"


NODES = {"n1": {"role": "edge"}, "n2": {"role": "core"}, "n3": {"role": "edge"}}


def no_configmaps(namespace: str, name: str) -> None:
    return None


def test_node_selector_picks_nodes(bpfprogram) -> None:
    placements = place([bpfprogram("p", {"matchLabels": {"role": "edge"}})], NODES, no_configmaps)
    assert placements[0].nodes == ["n1", "n3"]
    per_node = node_programs(placements, NODES)
    assert [e["bpfProgram"] for e in per_node["n1"]] == ["p"]
    assert per_node["n2"] == []


def test_no_selector_means_every_node(bpfprogram) -> None:
    placements = place([bpfprogram("p")], NODES, no_configmaps)
    assert placements[0].nodes == ["n1", "n2", "n3"]


def test_label_change_moves_program(bpfprogram) -> None:
    prog = bpfprogram("p", {"matchLabels": {"role": "edge"}})
    relabelled = {**NODES, "n2": {"role": "edge"}, "n1": {"role": "core"}}
    assert place([prog], relabelled, no_configmaps)[0].nodes == ["n2", "n3"]


def test_hash_is_stable_and_tracks_content(bpfprogram) -> None:
    a = place([bpfprogram("p")], NODES, no_configmaps)[0].entry
    b = place([copy.deepcopy(bpfprogram("p"))], NODES, no_configmaps)[0].entry
    changed = bpfprogram("p", cflags=["-DX=1"])
    c = place([changed], NODES, no_configmaps)[0].entry
    assert a is not None and b is not None and c is not None
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


def test_metadata_only_change_keeps_hash(bpfprogram) -> None:
    base = bpfprogram("p")
    relabelled = copy.deepcopy(base)
    relabelled["metadata"]["labels"] = {"team": "x"}
    relabelled["metadata"]["generation"] = 1
    one = place([base], NODES, no_configmaps)[0].entry
    two = place([relabelled], NODES, no_configmaps)[0].entry
    assert one is not None and two is not None and one.content_hash == two.content_hash


def test_deleting_program_is_placed_nowhere(bpfprogram) -> None:
    prog = bpfprogram("p")
    prog["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    placement = place([prog], NODES, no_configmaps)[0]
    assert placement.deleting and placement.nodes == [] and placement.entry is None
    assert node_programs([placement], NODES) == {"n1": [], "n2": [], "n3": []}


def test_configmap_source_resolved(bpfprogram) -> None:
    prog = bpfprogram("p", source={"configMapRef": {"namespace": "ns", "name": "code", "key": "prog.c"}})

    def lookup(namespace: str, name: str) -> dict[str, str] | None:
        return {"prog.c": SOURCE} if (namespace, name) == ("ns", "code") else None

    entry = place([prog], NODES, lookup)[0].entry
    assert entry is not None and entry.source == SOURCE


def test_missing_configmap_names_the_field(bpfprogram) -> None:
    prog = bpfprogram("p", source={"configMapRef": {"namespace": "ns", "name": "code", "key": "prog.c"}})
    placement = place([prog], NODES, no_configmaps)[0]
    assert placement.entry is None
    assert placement.error is not None and "spec.source.configMapRef" in placement.error
    assert "ns/code not found" in placement.error


def test_missing_configmap_key_lists_keys(bpfprogram) -> None:
    prog = bpfprogram("p", source={"configMapRef": {"namespace": "ns", "name": "code", "key": "prog.c"}})
    placement = place([prog], NODES, lambda ns, n: {"other.c": SOURCE})[0]
    assert placement.error is not None and "other.c" in placement.error


def test_entries_ordered_oldest_first_then_by_name_for_stable_bytes(bpfprogram) -> None:
    """The node daemon gives a metric family two BpfPrograms claim to the first entry: the oldest."""
    programs = [bpfprogram("b"), bpfprogram("a"), bpfprogram("z"), bpfprogram("y")]
    for body, created in zip(programs, ["2026-01-01T00:00:00Z"] * 2 + ["2025-06-01T00:00:00Z"] * 2, strict=True):
        body["metadata"]["creationTimestamp"] = created
    per_node = node_programs(place(programs, NODES, no_configmaps), NODES)
    assert [e["bpfProgram"] for e in per_node["n1"]] == ["y", "z", "a", "b"]


OBJECT = b"\x7fELF" + bytes(range(256)) * 4
BYTECODE_REF = {"configMapRef": {"namespace": "ns", "name": "objects", "key": "prog.o"}}


def _binary(objects: dict[str, bytes]):
    def lookup(namespace: str, name: str) -> dict[str, str] | None:
        if (namespace, name) != ("ns", "objects"):
            return None
        return {key: base64.b64encode(value).decode() for key, value in objects.items()}

    return lookup


def test_bytecode_from_configmap_binary_data_carries_its_digest(bpfprogram) -> None:
    prog = bpfprogram("p", source=None, bytecode=BYTECODE_REF, globalData={"step": "AQAAAAAAAAA="})
    entry = place([prog], NODES, no_configmaps, _binary({"prog.o": OBJECT}))[0].entry
    assert entry is not None and entry.source is None and entry.bytecode is not None
    assert base64.b64decode(entry.bytecode.object) == OBJECT
    assert entry.bytecode.sha256 == hashlib.sha256(OBJECT).hexdigest()
    assert entry.global_data == {"step": "AQAAAAAAAAA="}
    assert entry.content_hash == entry.expected_hash()

    changed_object = place([prog], NODES, no_configmaps, _binary({"prog.o": OBJECT + b"\0"}))[0].entry
    changed_data = place(
        [bpfprogram("p", source=None, bytecode=BYTECODE_REF, globalData={"step": "AgAAAAAAAAA="})],
        NODES,
        no_configmaps,
        _binary({"prog.o": OBJECT}),
    )[0].entry
    assert changed_object is not None and changed_data is not None
    assert len({entry.content_hash, changed_object.content_hash, changed_data.content_hash}) == 3


def test_bytecode_problems_name_the_field(bpfprogram) -> None:
    prog = bpfprogram("p", source=None, bytecode=BYTECODE_REF)
    cases = {
        "spec.bytecode.configMapRef: ConfigMap ns/objects not found": no_configmaps,
        "has no binaryData key 'prog.o' (binaryData keys: other.o)": _binary({"other.o": OBJECT}),
        "binaryData key 'prog.o' is empty": _binary({"prog.o": b""}),
    }
    for words, lookup in cases.items():
        placement = place([prog], NODES, no_configmaps, lookup)[0]
        assert placement.entry is None and placement.error is not None and words in placement.error, placement.error


def test_bytecode_over_the_cap_suggests_an_image(bpfprogram) -> None:
    prog = bpfprogram("p", source=None, bytecode=BYTECODE_REF)
    placement = place([prog], NODES, no_configmaps, _binary({"prog.o": b"\0" * (MAX_BYTECODE + 1)}))[0]
    assert placement.entry is None and placement.error is not None
    assert f"holds {MAX_BYTECODE + 1} bytes, more than the 256 KiB" in placement.error
    assert "llvm-strip -g" in placement.error and "spec.bytecode.image" in placement.error


# --- images (the registry answers stand in as Resolutions: the lookup is the I/O boundary) ------------

IMAGE = "reg.example:5000/bpf/counter:v1"
IMAGE_DIGEST = "sha256:" + "ab" * 32


def image_program(bpfprogram, name: str = "p") -> dict:
    return bpfprogram(name, source=None, bytecode={"image": IMAGE})


def resolved(reference: str, previous) -> Resolution:
    return Resolution(reference, IMAGE_DIGEST, f"{reference}@{IMAGE_DIGEST}", Verdict.VERIFIED, "signed by k")


def test_an_image_entry_names_only_the_pinned_digest(bpfprogram) -> None:
    placement = place([image_program(bpfprogram)], NODES, no_configmaps, image=resolved)[0]
    assert placement.entry is not None and placement.entry.bytecode is not None
    assert placement.entry.bytecode.image == f"{IMAGE}@{IMAGE_DIGEST}"
    assert placement.entry.bytecode.object is None
    assert placement.entry.bytecode.sha256 == "ab" * 32
    assert placement.image is not None and placement.image.status()["digest"] == IMAGE_DIGEST


def test_the_previous_status_image_is_handed_to_the_lookup(bpfprogram) -> None:
    seen = []
    body = image_program(bpfprogram)
    body["status"] = {"image": {"reference": IMAGE, "digest": IMAGE_DIGEST, "signature": "Verified"}}
    place([body], NODES, no_configmaps, image=lambda ref, previous: seen.append(previous) or resolved(ref, previous))
    assert seen == [body["status"]["image"]]


def test_an_unverified_image_under_require_reaches_no_node(bpfprogram) -> None:
    def unsigned(reference: str, previous) -> Resolution:
        return Resolution(
            reference,
            IMAGE_DIGEST,
            f"{reference}@{IMAGE_DIGEST}",
            Verdict.UNSIGNED,
            "no signature",
            error="image signature Unsigned and the cluster requires a verified one",
            reason="SignatureNotVerified",
        )

    placement = place([image_program(bpfprogram)], NODES, no_configmaps, image=unsigned)[0]
    assert placement.entry is None and placement.error_reason == "SignatureNotVerified" and not placement.hold
    running = {"bpfProgram": "p", "old": True}
    assert node_programs([placement], NODES, lambda node, name: running) == {n: [] for n in NODES}


def test_a_registry_outage_holds_what_each_node_runs(bpfprogram) -> None:
    def unreachable(reference: str, previous) -> Resolution:
        return Resolution(
            reference,
            error="spec.bytecode.image: RegistryUnavailable: ...",
            reason="ImageResolutionFailed",
            retry_in=4.0,
        )

    placement = place([image_program(bpfprogram)], NODES, no_configmaps, image=unreachable)[0]
    assert placement.entry is None and placement.hold
    running = {"n1": {"bpfProgram": "p", "generation": 1}}
    per_node = node_programs([placement], NODES, lambda node, name: running.get(node))
    assert per_node == {"n1": [running["n1"]], "n2": [], "n3": []}
