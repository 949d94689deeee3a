"""Shared fixtures: real PostgreSQL and Redis (the machine's when DATABASE_URL / REDIS_URL are
set, else embedded ones from the pip wheels), a gateway on a free port, signing keys and tokens.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ingest_service.config import GatewayConfig, load_config
from ingest_service.embedded import EmbeddedPostgres, EmbeddedRedis
from ingest_service.envoy_front import EnvoyFront
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2_grpc

ISSUER = "https://issuer.test/"
AUDIENCE = "https://api.welltegra.com"


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    # Not under pytest's tmp dir: as root, Postgres runs as its own account and must traverse
    # the path, and pytest resets its base dir to 0700 at every run.
    path = Path(tempfile.mkdtemp(prefix="welltegra-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(embedded_dir: Path) -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    with EmbeddedPostgres(embedded_dir) as server:
        assert server.url is not None
        yield server.url


@pytest.fixture(scope="session")
def redis_url(embedded_dir: Path) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedRedis(embedded_dir) as server:
        assert server.url is not None
        yield server.url


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def public_key_file(tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path_factory.mktemp("keys") / "issuer.pub.pem"
    path.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def claims_for(tenant: str, **overrides: Any) -> dict[str, Any]:
    """The claims of a valid token of the test issuer for ``tenant``, with ``overrides``."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "test-client",
        "iat": now,
        "exp": now + 600,
        "scope": "api:ingest",
        "tenant_id": tenant,
    }
    claims.update(overrides)
    return claims


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def make_token(rsa_key: rsa.RSAPrivateKey) -> TokenFactory:
    """``make_token(tenant, **claim_overrides)``: an RS256 token from the test issuer; pass
    ``key=``/``algorithm=`` to sign otherwise, a claim set to ``None`` to leave it out."""

    def factory(
        tenant: str,
        *,
        key: Any = None,
        algorithm: str = "RS256",
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        claims = {k: v for k, v in claims_for(tenant, **overrides).items() if v is not None}
        return jwt.encode(
            claims, rsa_key if key is None else key, algorithm=algorithm, headers=headers
        )

    return factory


@pytest.fixture(scope="session")
def master_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "master.key"
    path.write_bytes(base64.b64encode(os.urandom(32)))
    return path


@pytest.fixture(scope="session")
def master_key(master_key_file: Path) -> str:
    """The master key as WELLTEGRA_MASTER_KEY takes it, for CLI subprocesses."""
    return master_key_file.read_text().strip()


@pytest.fixture(scope="session")
def gateway_config(
    tmp_path_factory: pytest.TempPathFactory, public_key_file: Path, master_key_file: Path
) -> GatewayConfig:
    return load_config(
        overrides={
            "grpc_listen": "127.0.0.1:0",
            "data_dir": str(tmp_path_factory.mktemp("gateway")),
            "master_key_file": str(master_key_file),
            "auth": {"issuer": ISSUER, "public_key_files": [str(public_key_file)]},
            # Tests send fast; the limits tests lower them per tenant.
            "limits": {"requests_per_minute": 1_000_000, "bytes_per_day": 10**15},
        },
        environ={},
    )


@pytest.fixture(scope="session")
async def gateway(
    gateway_config: GatewayConfig, database_url: str, redis_url: str
) -> AsyncIterator[Gateway]:
    gw = Gateway(gateway_config, database_url, redis_url)
    try:
        await gw.start()
        yield gw
    finally:
        await gw.stop(grace=1)


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[ingest_pb2_grpc.IngestServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def tenant(gateway: Gateway) -> AsyncIterator[str]:
    """A freshly provisioned tenant, dropped afterwards so shared databases stay clean."""
    name = f"t_{secrets.token_hex(5)}"
    await gateway.storage.create_tenant(name)
    yield name
    await gateway.audit.flush()
    await gateway.storage.drop_tenant(name)
    await gateway.storage.pool.execute(
        "DELETE FROM system_monitoring.audit_log WHERE tenant_id = $1", name
    )


@pytest.fixture(scope="session")
def envoy_front(gateway: Gateway, embedded_dir: Path) -> Iterator[EnvoyFront]:
    """A real Envoy (TLS 1.3, transcoding) in front of the session's gateway."""
    front = EnvoyFront(embedded_dir / "front", "127.0.0.1:0", upstream_port=gateway.port)
    front.start()
    yield front
    front.stop()


@pytest.fixture
async def rest(envoy_front: EnvoyFront) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP/2 client of the Envoy front that trusts its development certificate."""
    context = ssl.create_default_context(cafile=str(envoy_front.certificate))
    async with httpx.AsyncClient(
        base_url=f"https://localhost:{envoy_front.port}", verify=context, http2=False, timeout=30
    ) as client:
        yield client
