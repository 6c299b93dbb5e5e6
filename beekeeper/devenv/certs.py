"""Self-made PKI for the local control plane: a CA, serving certs, an admin client, SA keys.

The apiserver runs with client-certificate authentication and RBAC like a real cluster,
so the admin kubeconfig carries a `system:masters` client certificate signed by our CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class Pki:
    """Paths of every PEM file the control plane and its clients need."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _sign(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usages: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_pki(directory: Path, server_ips: Sequence[str] = ()) -> Pki:
    """Create the PKI once; reuse it on later starts so kubeconfigs stay valid.

    server_ips are extra serving-cert addresses: the one pods reach the apiserver on and the
    `kubernetes` Service IP, so in-cluster clients verify the certificate like on a cluster.
    """
    pki = Pki(directory)
    if all(p.exists() for p in (pki.ca_cert, pki.serving_cert, pki.admin_cert, pki.sa_key, pki.sa_pub)):
        return pki
    directory.mkdir(parents=True, exist_ok=True)

    ca_key = _key()
    ca_name = _name("beekeeper-dev-ca")
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.ca_cert, _sign(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True))

    serving_key = _key()
    _write_key(pki.serving_key, serving_key)
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *server_ips)),
    ]
    serving = _sign(
        _name("kube-apiserver"),
        serving_key.public_key(),
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=sans,
    )
    _write_cert(pki.serving_cert, serving)

    admin_key = _key()
    _write_key(pki.admin_key, admin_key)
    admin = _sign(
        _name("beekeeper-admin", "system:masters"),
        admin_key.public_key(),
        ca_name,
        ca_key,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_cert(pki.admin_cert, admin)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki


def ensure_serving_cert(pki: Pki, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """(cert, key) for a server of the environment (a node daemon), signed by the CA clients already trust.

    Clients that verify with the kubeconfig's CA (`beekeeper why-dropped`) then trust it too.
    """
    cert_path, key_path = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    if cert_path.exists() and key_path.exists():
        try:  # still from this CA (ensure_pki makes a new one when files went missing)
            x509.load_pem_x509_certificate(cert_path.read_bytes()).verify_directly_issued_by(ca)
            return cert_path, key_path
        except (ValueError, TypeError, InvalidSignature):
            pass
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = ca.subject
    key = _key()
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = _sign(_name(name), key.public_key(), ca_name, ca_key, usages=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def ensure_client_cert(pki: Pki, name: str, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
    """A client certificate (user = CN, groups = O) signed by the CA, e.g. a kubelet's system:node:NAME."""
    cert, key = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    if cert.exists() and key.exists():
        return cert, key
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    client_key = _key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
    signed = _sign(x509.Name(attrs), client_key.public_key(), ca_name, ca_key, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    _write_key(key, client_key)
    _write_cert(cert, signed)
    return cert, key
