"""Token keys from a real JWKS endpoint (cached, refreshed on an unknown kid), EdDSA and ES256
keys from PEM files, and TLS on the gRPC port."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingest_service.auth import TokenVerifier
from ingest_service.config import AuthConfig, GatewayConfig, TlsConfig
from ingest_service.errors import InvalidToken
from ingest_service.server import Gateway

from ..conftest import AUDIENCE, ISSUER


class JwksServer:
    """A JWKS endpoint on loopback whose key set a test can change; counts its fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def publish(self, key: rsa.RSAPrivateKey, kid: str) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        self.keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 300,
        "scope": "api:ingest",
        "tenant_id": "tenant_a",
        "sub": "client-1",
        **extra,
    }


async def test_jwks_keys_are_cached_and_refreshed_on_rotation(jwks: JwksServer) -> None:
    first, second = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "ab")
    jwks.publish(first, "key-1")
    config = AuthConfig(jwks_url=jwks.url, issuer=ISSUER, jwks_refresh_cooldown="200ms")
    verifier = TokenVerifier(config, ISSUER)
    token = jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "key-1"})
    for _ in range(3):
        principal = await verifier.verify(token)
    assert (principal.tenant_id, principal.subject) == ("tenant_a", "client-1")
    assert jwks.fetches == 1  # cached

    # The issuer rotates: a token with a new kid makes the verifier fetch the set again, once
    # the cooldown since the last fetch has passed.
    jwks.publish(second, "key-2")
    await asyncio.sleep(0.3)
    rotated = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "key-2"})
    assert (await verifier.verify(rotated)).tenant_id == "tenant_a"
    assert jwks.fetches == 2

    forged = jwt.encode(
        claims(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers={"kid": "key-3"},
    )
    with pytest.raises(InvalidToken, match="no key found"):
        await verifier.verify(forged)
    wrong_key_same_kid = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "key-1"})
    with pytest.raises(InvalidToken, match="signature is not valid"):
        await verifier.verify(wrong_key_same_kid)


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
    ids=["EdDSA", "ES256"],
)
async def test_pem_keys_of_every_asymmetric_kind(tmp_path: Path, key: Any, algorithm: str) -> None:
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verifier = TokenVerifier(AuthConfig(public_key_files=(pem,)), ISSUER)
    token = jwt.encode(claims(permissions=["api:ingest"], scope=None), key, algorithm=algorithm)
    assert (await verifier.verify(token)).scopes == {"api:ingest"}


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_on_the_grpc_port(
    tmp_path: Path, gateway_config: GatewayConfig, database_url: str
) -> None:
    cert_file, key_file = self_signed(tmp_path)
    tls = TlsConfig(cert_file=cert_file, key_file=key_file)
    config = gateway_config.model_copy(update={"tls": tls})
    gateway = Gateway(config, database_url, None)
    await gateway.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{gateway.port}", credentials) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.stop(grace=1)
