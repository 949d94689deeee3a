"""Development key material kept in the data directory: the signing key for tokens (the demo,
tests and self-hosting without an identity provider) and a self-signed TLS certificate for the
local Envoy front.

The key is an ES256 (P-256) key pair kept in the data directory (private key readable by its
owner only). ``welltegra-ingest token mint`` signs with it; ``welltegra-ingest serve --dev``
trusts its public half. Production trusts an identity provider's JWKS instead.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingest_service.config import DEV_ISSUER

__all__ = ["DevSigningKey", "ensure_dev_certificate", "write_secret_file"]


def write_secret_file(path: Path, data: bytes) -> None:
    """Write key material readable by its owner only, never world-readable even for an
    instant (the mode is set when the file is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


class DevSigningKey:
    """An ES256 key pair on disk that mints development access tokens."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, public_path: Path) -> None:
        self._private_key = private_key
        self.public_path = public_path
        self.kid = public_path.stem

    @classmethod
    def load_or_create(cls, path: Path) -> DevSigningKey:
        """Load the key at ``path``, creating it (and its ``.pub.pem``) on first use."""
        public_path = path.with_suffix(".pub.pem")
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path} does not hold an EC private key")
            private_key = loaded
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            private_key = ec.generate_private_key(ec.SECP256R1())
            pem = private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_secret_file(path, pem)
        if not public_path.exists():
            public_path.write_bytes(
                private_key.public_key().public_bytes(
                    serialization.Encoding.PEM,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                )
            )
        return cls(private_key, public_path)

    def mint(
        self,
        tenant_id: str,
        audience: str,
        scopes: Iterable[str] = ("api:ingest",),
        ttl_seconds: int = 3600,
        subject: str = "dev-client",
        tenant_claim: str = "tenant_id",
        issuer: str = DEV_ISSUER,
    ) -> str:
        """A signed access token for ``tenant_id`` valid for ``ttl_seconds``."""
        now = int(time.time())
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
            "jti": secrets.token_hex(8),
            "scope": " ".join(scopes),
            tenant_claim: tenant_id,
        }
        return jwt.encode(claims, self._private_key, algorithm="ES256", headers={"kid": self.kid})


def ensure_dev_certificate(
    directory: Path, hosts: Iterable[str] = ("localhost",)
) -> tuple[Path, Path]:
    """A self-signed TLS certificate and key for ``hosts`` plus 127.0.0.1 and ::1, created in
    ``directory`` on first use and kept (key readable by its owner only). For laptops and tests:
    production mounts a certificate from a real authority."""
    cert_path, key_path = directory / "dev-tls.crt", directory / "dev-tls.key"
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        # Renewed a month before it expires, so a long-lived laptop setup keeps working.
        if existing.not_valid_after_utc - datetime.now(UTC) > timedelta(days=30):
            return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys(hosts))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.now(UTC)
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternatives += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret_file(key_path, key_pem)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
