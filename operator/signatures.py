"""Key-based cosign signatures of an image, checked: pure functions over what the registry returned.

cosign (`cosign sign --key`) stores the signatures of image digest sha256:H as an OCI image
tagged `sha256-H.sig` in the same repository. Each of its layers is a simple-signing payload
(media type application/vnd.dev.cosign.simplesigning.v1+json, a JSON document naming the
signed manifest digest), with the base64 ASN.1 signature over the payload bytes in the
layer's `dev.cosignproject.cosign/signature` annotation. An image is verified when one
layer's signature checks out with one trusted public key and its payload names the digest.
Keyless (Fulcio certificates, Rekor) is not read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from beekeeper.crds.bpfprogram import SignatureVerdict as Verdict

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
MAX_PAYLOAD = 64 * 1024

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


@dataclass(frozen=True)
class TrustedKey:
    name: str
    """Where it came from (file name) and its fingerprint, for messages."""
    key: ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class SignedLayer:
    """One layer of the signature image: its annotation and payload as fetched (digest-checked)."""

    media_type: str
    signature: str | None
    payload: bytes


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    message: str


def signature_tag(digest: str) -> str:
    """sha256:H -> sha256-H.sig, the tag cosign stores the signatures under."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}-{hex_digest}.sig"


def load_keys(pem_files: Sequence[tuple[str, bytes]]) -> list[TrustedKey]:
    """EC public keys in PEM (what `cosign generate-key-pair` writes to cosign.pub); bad files raise ValueError."""
    keys = []
    for name, data in pem_files:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: not a PEM public key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _HASHES:
            raise ValueError(f"{name}: only ECDSA P-256/P-384/P-521 public keys are supported (cosign's default)")
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        keys.append(TrustedKey(f"{name} (sha256:{hashlib.sha256(der).hexdigest()[:16]})", key))
    return keys


def _signed_digest(payload: bytes) -> str | None:
    try:
        doc = json.loads(payload)
        critical = doc["critical"]
        if critical.get("type") != PAYLOAD_TYPE:
            return None
        digest = critical["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def _verifies(key: TrustedKey, signature: bytes, payload: bytes) -> bool:
    try:
        key.key.verify(signature, payload, ec.ECDSA(_HASHES[key.key.curve.name]()))
        return True
    except InvalidSignature:
        return False


def check(layers: Sequence[SignedLayer], keys: Sequence[TrustedKey], digest: str) -> Outcome:
    """The verdict for `digest` given the signature image's layers (empty: no signature image)."""
    if not keys:
        return Outcome(Verdict.INVALID, "no trusted keys are configured, so no signature can verify")
    candidates = [layer for layer in layers if layer.media_type == SIMPLE_SIGNING and layer.signature]
    if not candidates:
        return Outcome(Verdict.UNSIGNED, f"no cosign signature for {digest} (tag {signature_tag(digest)})")
    problems = []
    for layer in candidates:
        try:
            raw = base64.b64decode(layer.signature or "", validate=True)
        except (binascii.Error, ValueError):
            problems.append("a signature annotation is not base64")
            continue
        signer = next((key for key in keys if _verifies(key, raw, layer.payload)), None)
        if signer is None:
            problems.append("a signature verifies with none of the trusted keys")
            continue
        signed = _signed_digest(layer.payload)
        if signed != digest:
            problems.append(f"a payload signed by {signer.name} names {signed or 'no digest'}, not {digest}")
            continue
        return Outcome(Verdict.VERIFIED, f"signed by {signer.name}")
    return Outcome(Verdict.INVALID, f"{len(candidates)} signature(s), none valid: " + "; ".join(sorted(set(problems))))
