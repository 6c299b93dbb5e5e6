"""BpfPrograms from OCI images: a real registry (TLS), images built and pushed by buildah as bpfman builds
them, signed by the real cosign; the real apiserver, operator and node daemons, the real kernel."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from core_objects import SYSCALL_COUNTER, compile_core
from registry_rig import OciRig
from support import Api, OperatorProcess, check_exposition, component_env, wait_for

from beekeeper.crds.names import BPF_PROGRAM_PLURAL, GROUP, VERSION

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

PROGRAMS_LABEL = {"count_syscalls": "tracepoint"}
MAPS_LABEL = {"counts": "hash"}


def compile_object(directory: Path, variant: int) -> Path:
    """A CO-RE object as a user builds one (variant makes distinct bytes), in a file for buildah's COPY."""
    directory.mkdir(parents=True, exist_ok=True)
    obj = directory / f"counter{variant}.o"
    obj.write_bytes(compile_core(SYSCALL_COUNTER.replace("VARIANT", str(variant)), f"counter{variant}"))
    return obj


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("objects")
    return [compile_object(directory, n) for n in range(4)]


@pytest.fixture(scope="module")
def pushed(oci_rig: OciRig, objects: list[Path]) -> dict[str, str]:
    """repository:tag -> digest of the images the tests use (each object in its own repository)."""
    out = {}
    for n, obj in enumerate(objects):
        repo = f"bpf/counter{n}"
        out[repo] = oci_rig.builder.build_and_push(repo, "v1", obj, PROGRAMS_LABEL, MAPS_LABEL)
    return out


@pytest.fixture(scope="module")
def oci_rig(oci_registry: OciRig) -> OciRig:
    return oci_registry


def image_program(name: str, node: str, image: str, metric: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
        "bytecode": {"image": image},
        "programs": [{"name": "count_syscalls", "type": "tracepoint", "tracepoint": "raw_syscalls:sys_enter"}],
    }
    if metric:
        spec["metrics"] = [
            {"map": "counts", "name": metric, "type": "counter", "key": {"kind": "int", "label": "variant"}}
        ]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BpfProgram", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def api(cluster) -> Api:
    return Api(cluster)


@pytest.fixture
def names(api: Api) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        api.delete(name)


class Operator:
    """The session's operator, restarted with an image verification policy; restored afterwards."""

    def __init__(self, process: OperatorProcess, cluster, rig: OciRig) -> None:
        self.process = process
        self.original = dict(process.env)
        self.base = {**component_env(cluster.kubeconfig), "BEEKEEPER_REGISTRY_CA_FILE": str(rig.registry.ca)}
        self.policy: str | None = None

    def use(self, policy: str, keys: Path | None = None) -> None:
        env = {**self.base, "BEEKEEPER_IMAGE_VERIFICATION": policy}
        if keys is not None:
            env["BEEKEEPER_IMAGE_VERIFICATION_KEYS"] = str(keys)
        if env != self.process.env:
            self.process.restart(env=env)
        self.policy = policy

    def restore(self) -> None:
        if self.process.env != self.original:
            self.process.restart(env=self.original)


@pytest.fixture(scope="module")
def image_operator(cluster, operator_process: OperatorProcess, oci_rig: OciRig) -> Iterator[Operator]:
    operator = Operator(operator_process, cluster, oci_rig)
    operator.use("off")
    yield operator
    operator.restore()


@pytest.fixture
def node(node_daemons, oci_rig: OciRig, image_operator: Operator):
    """One simulated node whose daemon trusts the registry's CA."""
    return node_daemons(args=["--registry-ca-file", str(oci_rig.registry.ca)])


def pinned(rig: OciRig, repo: str, digest: str) -> str:
    return f"{rig.registry.address}/{repo}@{digest}"


def uid() -> str:
    return uuid.uuid4().hex[:6]


def prog_loaded(program_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(program_id)], capture_output=True).returncode == 0


# --- pull by digest, metrics, cache -------------------------------------------------------


def test_image_pinned_by_digest_runs_and_exports_metrics_and_is_cached(
    api: Api, names: list[str], node, oci_rig: OciRig, pushed: dict[str, str], objects: list[Path]
) -> None:
    repo, digest = "bpf/counter0", pushed["bpf/counter0"]
    name = f"img-{uid()}"
    names.append(name)
    blobs_before = oci_rig.registry.fetches(repo)
    api.apply(image_program(name, node.node, pinned(oci_rig, repo, digest), metric=f"image_syscalls_{name[4:]}_total"))
    status = api.ready(name)
    assert status["image"]["digest"] == digest
    assert status["image"]["signature"] == "NotChecked"
    entry = next(p for p in api.nodestate(node.node)["spec"]["programs"] if p["bpfProgram"] == name)
    assert entry["bytecode"]["image"] == pinned(oci_rig, repo, digest)
    assert oci_rig.registry.fetches(repo) == blobs_before + 2  # config and layer, once

    family = f"image_syscalls_{name[4:]}"
    samples = wait_for(
        lambda: (s := check_exposition(node.metrics()).get(family)) and any(v > 0 for v in s.values()) and s,
        30,
        "the image's map exported with counts",
    )
    assert [dict(labels)["variant"] for _, labels in samples] == ["0"]

    # A second BpfProgram on the same digest, a daemon restart, and a third after it: nothing is pulled again.
    second, third = f"img-{uid()}", f"img-{uid()}"
    names += [second, third]
    api.apply(image_program(second, node.node, pinned(oci_rig, repo, digest)))
    api.ready(second)
    ids = {p["name"]: p["programIds"] for p in api.node_reports(node.node, name)}
    node.stop()
    node.start()
    api.apply(image_program(third, node.node, pinned(oci_rig, repo, digest)))
    api.ready(third)  # the restarted daemon has reconciled every entry
    assert {p["name"]: p["programIds"] for p in api.node_reports(node.node, name)} == ids  # re-adopted, not reloaded
    assert oci_rig.registry.fetches(repo) == blobs_before + 2
    assert (node.state_dir / "images" / digest.split(":")[1] / "object.o").read_bytes() == objects[0].read_bytes()


def test_a_tag_is_resolved_once_and_nodes_get_the_digest(
    api: Api, names: list[str], node, oci_rig: OciRig, objects: list[Path]
) -> None:
    repo = f"bpf/tagged-{uid()}"
    first = oci_rig.builder.build_and_push(repo, "stable", objects[1], PROGRAMS_LABEL, MAPS_LABEL)
    name = f"img-{uid()}"
    names.append(name)
    api.apply(image_program(name, node.node, f"{oci_rig.registry.address}/{repo}:stable"))
    status = api.ready(name)
    assert status["image"]["digest"] == first
    entry = next(p for p in api.nodestate(node.node)["spec"]["programs"] if p["bpfProgram"] == name)
    assert entry["bytecode"]["image"] == f"{oci_rig.registry.address}/{repo}:stable@{first}"

    # The tag moves; the program keeps the digest it was resolved to while its reference is unchanged.
    moved = oci_rig.builder.build_and_push(repo, "stable", objects[2], PROGRAMS_LABEL, MAPS_LABEL)
    assert moved != first
    api.custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        BPF_PROGRAM_PLURAL,
        name,
        {"spec": {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node.node, **node.test_labels}}}},
    )
    wait_for(lambda: api.status(name).get("observedGeneration") == 2, 30, "second generation seen")
    assert api.status(name)["image"]["digest"] == first
    entry = next(p for p in api.nodestate(node.node)["spec"]["programs"] if p["bpfProgram"] == name)
    assert entry["bytecode"]["image"].endswith(first)


# --- failures ----------------------------------------------------------------------------


def test_a_digest_mismatch_is_rejected_with_the_reason(
    api: Api, names: list[str], node, oci_rig: OciRig, objects: list[Path]
) -> None:
    """A registry (or a proxy) serving other bytes than the pinned ones: the layer fails its digest check."""
    repo = f"bpf/tampered-{uid()}"
    digest = oci_rig.builder.build_and_push(repo, "v1", objects[3], PROGRAMS_LABEL, MAPS_LABEL)
    manifest = json_blob(oci_rig, digest)
    layer = blob_path(oci_rig, manifest["layers"][0]["digest"])
    original = layer.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0xFF
    layer.write_bytes(bytes(tampered))
    try:
        name = f"img-{uid()}"
        names.append(name)
        api.apply(image_program(name, node.node, pinned(oci_rig, repo, digest)))
        failure = api.failing(name, "DigestMismatch")
        assert manifest["layers"][0]["digest"] in failure["message"]
        assert not (node.state_dir / "images" / digest.split(":")[1]).exists()
    finally:
        layer.write_bytes(original)


def test_a_missing_image_fails_only_that_program(
    api: Api, names: list[str], node, oci_rig: OciRig, pushed: dict[str, str]
) -> None:
    good, missing = f"img-{uid()}", f"img-{uid()}"
    names += [good, missing]
    api.apply(image_program(good, node.node, pinned(oci_rig, "bpf/counter0", pushed["bpf/counter0"])))
    nowhere = "sha256:" + hashlib.sha256(uid().encode()).hexdigest()  # (a cached digest would need no pull)
    api.apply(image_program(missing, node.node, pinned(oci_rig, "bpf/nothing-here", nowhere)))
    failure = api.failing(missing, "ImageNotFound")
    assert "bpf/nothing-here" in failure["message"]
    api.ready(good)


def test_a_registry_outage_keeps_attached_programs_running_and_converges_after(
    api: Api, names: list[str], node, oci_rig: OciRig, pushed: dict[str, str]
) -> None:
    name = f"img-{uid()}"
    names.append(name)
    api.apply(image_program(name, node.node, pinned(oci_rig, "bpf/counter1", pushed["bpf/counter1"])))
    api.ready(name)
    running = [i for p in api.node_reports(node.node, name) for i in p["programIds"]]

    oci_rig.registry.stop()
    try:
        api.apply(image_program(name, node.node, pinned(oci_rig, "bpf/counter2", pushed["bpf/counter2"])))
        failure = api.failing(name, "RegistryUnavailable")
        assert "cannot reach" in failure["message"]
        assert all(prog_loaded(i) for i in running), "the attached program must keep running"
        assert (node.bpffs_root / "programs" / name).exists()
    finally:
        oci_rig.registry.start()
    status = api.ready(name, timeout=90)  # the daemon's back-off retries the pull
    assert status["image"]["digest"] == pushed["bpf/counter2"]


def json_blob(rig: OciRig, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(rig, digest).read_bytes())


def blob_path(rig: OciRig, digest: str) -> Path:
    hex_digest = digest.split(":")[1]
    return rig.registry.dir / "storage/docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"


# --- signatures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_images(oci_rig: OciRig, objects: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """signed / unsigned / foreign (signed by a key the cluster does not trust) -> pinned reference."""
    refs = {}
    for kind, obj in zip(("signed", "unsigned", "foreign"), objects[:3], strict=True):
        repo = f"bpf/sig-{kind}-{uid()}"
        digest = oci_rig.builder.build_and_push(repo, "v1", obj, PROGRAMS_LABEL, MAPS_LABEL)
        refs[kind] = pinned(oci_rig, repo, digest)
    oci_rig.cosign.sign(refs["signed"])
    stranger = type(oci_rig.cosign)(tmp_path_factory.mktemp("stranger"), oci_rig.registry)
    stranger.sign(refs["foreign"])
    return refs


EXPECTED = {
    "require": {"signed": "Verified", "unsigned": "Unsigned", "foreign": "Invalid"},
    "warn": {"signed": "Verified", "unsigned": "Unsigned", "foreign": "Invalid"},
    "off": {"signed": "NotChecked", "unsigned": "NotChecked", "foreign": "NotChecked"},
}


@pytest.mark.parametrize("policy", ["require", "warn", "off"])
def test_signature_verdicts_under_each_policy(
    policy: str,
    api: Api,
    names: list[str],
    node_daemons,
    oci_rig: OciRig,
    image_operator: Operator,
    signed_images: dict[str, str],
) -> None:
    image_operator.use(policy, oci_rig.cosign.public_key)
    node = node_daemons(backend="fake", args=["--registry-ca-file", str(oci_rig.registry.ca)])
    for kind, ref in signed_images.items():
        name = f"sig-{policy}-{kind}-{uid()}"
        names.append(name)
        api.apply(image_program(name, node.node, ref))
        expected = EXPECTED[policy][kind]
        status = wait_for(
            lambda n=name: (s := api.status(n)).get("image", {}).get("signature") and s, 60, f"{name} verdict"
        )
        assert status["image"]["signature"] == expected, status["image"]
        if policy == "require" and kind != "signed":
            status = wait_for(lambda n=name: (s := api.status(n)).get("phase") == "Degraded" and s, 30, "Degraded")
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            assert degraded["reason"] == "SignatureNotVerified"
            assert expected in degraded["message"]
            entries = api.nodestate(node.node)["spec"].get("programs") or []
            assert name not in [e["bpfProgram"] for e in entries], "an unverified image must not roll out"
        else:
            api.ready(name)
            if kind == "signed" and policy != "off":
                assert "cosign.pub" in status["image"]["message"]
