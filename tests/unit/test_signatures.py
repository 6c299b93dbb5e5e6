"""cosign key-based signature checks over simple-signing payloads (the verdicts, without a registry)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from beekeeper.operator import signatures
from beekeeper.operator.signatures import SIMPLE_SIGNING, SignedLayer, Verdict

DIGEST = "sha256:" + "12" * 32
OTHER = "sha256:" + "34" * 32


def payload(digest: str, kind: str = signatures.PAYLOAD_TYPE) -> bytes:
    doc = {
        "critical": {
            "identity": {"docker-reference": "10.243.0.1:5443/bpf/xdp"},
            "image": {"docker-manifest-digest": digest},
            "type": kind,
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def signed(key: ec.EllipticCurvePrivateKey, body: bytes) -> SignedLayer:
    sig = base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()
    return SignedLayer(SIMPLE_SIGNING, sig, body)


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_signature_tag() -> None:
    assert signatures.signature_tag(DIGEST) == f"sha256-{'12' * 32}.sig"


def test_a_valid_signature_verifies(key) -> None:
    trusted = signatures.load_keys([("cosign.pub", pem(key))])
    outcome = signatures.check([signed(key, payload(DIGEST))], trusted, DIGEST)
    assert outcome.verdict == Verdict.VERIFIED
    assert "cosign.pub (sha256:" in outcome.message


def test_one_good_layer_among_bad_ones_verifies(key) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    trusted = signatures.load_keys([("k", pem(key))])
    layers = [signed(stranger, payload(DIGEST)), signed(key, payload(DIGEST))]
    assert signatures.check(layers, trusted, DIGEST).verdict == Verdict.VERIFIED


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda k, s: [signed(s, payload(DIGEST))], "none of the trusted keys"),
        (lambda k, s: [signed(k, payload(OTHER))], f"names {OTHER}"),
        (lambda k, s: [signed(k, payload(DIGEST, "something else"))], "names no digest"),
        (lambda k, s: [SignedLayer(SIMPLE_SIGNING, "%%%", payload(DIGEST))], "not base64"),
        (
            lambda k, s: [SignedLayer(SIMPLE_SIGNING, signed(k, payload(DIGEST)).signature, payload(DIGEST) + b" ")],
            "none of the trusted keys",
        ),
    ],
)
def test_bad_signatures_are_invalid_and_say_why(key, make, words: str) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    outcome = signatures.check(make(key, stranger), signatures.load_keys([("k", pem(key))]), DIGEST)
    assert outcome.verdict == Verdict.INVALID
    assert words in outcome.message


def test_no_signature_layers_is_unsigned(key) -> None:
    trusted = signatures.load_keys([("k", pem(key))])
    assert signatures.check([], trusted, DIGEST).verdict == Verdict.UNSIGNED
    other_layer = SignedLayer("application/vnd.oci.image.layer.v1.tar", None, b"")
    assert signatures.check([other_layer], trusted, DIGEST).verdict == Verdict.UNSIGNED


def test_without_trusted_keys_nothing_verifies(key) -> None:
    assert signatures.check([signed(key, payload(DIGEST))], [], DIGEST).verdict == Verdict.INVALID


def test_keys_that_are_not_ecdsa_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"rsa\.pub: only ECDSA"):
        signatures.load_keys([("rsa.pub", pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))])
    with pytest.raises(ValueError, match="junk: not a PEM public key"):
        signatures.load_keys([("junk", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")])
