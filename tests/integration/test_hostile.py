"""Hostile input against the real gateway, over gRPC and REST (through Envoy): forged tokens,
ids built to break SQL or Redis keys, messages at and past the size limit, numbers and times at
and past their edges, and requests that name another tenant.

Each case states the exact answer (gRPC status, ErrorInfo reason, message or field violation;
for REST the HTTP status and the documented body) and checks what reached storage: nothing for a
refusal, the point verbatim for an id the gateway accepts, and, after injection attempts, the
schemas and tables still in place. test_refusals.py holds the plain refusal paths; this file
does not repeat them.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf.internal.encoder import _VarintBytes
from redis import asyncio as aioredis

from ingest_service.config import AuthConfig, GatewayConfig
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import ISSUER, TokenFactory, claims_for
from .test_ingest import auth, point, stored_count
from .test_limits import refused_count as refusals_of
from .test_limits import retry_delay
from .test_refusals import REALTIME, encoded_request, other_rsa_key, rich_status
from .test_rest import REALTIME as REST_REALTIME
from .test_rest import bearer, post_uploading
from .test_token_keys import JwksServer

MiB = 1024 * 1024
LIMIT = 10 * MiB  # max_message_bytes and Envoy's REST body limit: 10,485,760 bytes
ALGORITHMS = (
    "['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA']"
)
TENANT_PATTERN = "^[a-z][a-z0-9_]{1,47}$"
MISMATCH = "Token tenant_id does not match request tenant_id"
BAD_SIGNATURE = "access token signature is not valid"
PARAMETER = "wellhead_pressure"
# A key that a Redis command smuggled inside an id would create; it must never exist.
SMUGGLED_KEY = "wt_hostile_smuggled"


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def forget_keys(redis: aioredis.Redis, tenant: str) -> None:
    """Drop a tenant's cache and limit keys (the tenant fixture leaves them to their TTLs)."""
    for pattern in (f"realtime:{{{tenant}}}:*", f"limits:{{{tenant}}}:*"):
        keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
        if keys:
            await redis.delete(*keys)


@pytest.fixture(autouse=True)
async def _keys_dropped(tenant: str, redis: aioredis.Redis) -> AsyncIterator[None]:
    yield
    await forget_keys(redis, tenant)


@pytest.fixture
async def other_tenant(gateway: Gateway, redis: aioredis.Redis) -> AsyncIterator[str]:
    """A second provisioned tenant: the one a hostile request tries to reach."""
    name = f"t_{secrets.token_hex(5)}"
    await gateway.storage.create_tenant(name)
    yield name
    await gateway.audit.flush()
    await gateway.storage.drop_tenant(name)
    await gateway.storage.pool.execute(
        "DELETE FROM system_monitoring.audit_log WHERE tenant_id = $1", name
    )
    await forget_keys(redis, name)


@pytest.fixture(scope="session")
def issuer_pem(public_key_file: Path) -> bytes:
    """The issuer's public key exactly as the gateway reads it: public, so an attacker has it."""
    return public_key_file.read_bytes()


async def cache_snapshot(redis: aioredis.Redis, tenant: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every cache key of ``tenant`` with its hash."""
    keys = [k async for k in redis.scan_iter(match=f"realtime:{{{tenant}}}:*", count=1000)]
    return {key: await redis.hgetall(key) for key in keys}


async def assert_intact(db: asyncpg.Connection, *tenants: str) -> None:
    """The shared schemas and each tenant's registration, schema and tables are all there."""
    schemas = {
        row["nspname"]
        for row in await db.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[])",
            ["public", "welltegra", "system_monitoring", *(f"{t}_streams" for t in tenants)],
        )
    }
    assert schemas == {"public", "welltegra", "system_monitoring"} | {
        f"{t}_streams" for t in tenants
    }
    assert await db.fetchval("SELECT to_regclass('welltegra.tenants') IS NOT NULL")
    assert await db.fetchval("SELECT to_regclass('system_monitoring.audit_log') IS NOT NULL")
    for tenant in tenants:
        for table in ("real_time_parameters", "batch_ledger", "quarantine"):
            name = f'"{tenant}_streams".{table}'
            assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", name), name
        assert (
            await db.fetchval("SELECT count(*) FROM welltegra.tenants WHERE tenant_id = $1", tenant)
            == 1
        )


async def quarantined_count(db: asyncpg.Connection, tenant: str) -> int:
    count: int = await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".quarantine')
    return count


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_status(
    error: grpc.aio.AioRpcError,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    violations: list[tuple[str, str]] | None = None,
) -> None:
    assert (error.code(), error.details()) == (code, message)
    got_reason, got_violations = rich_status(error)
    assert got_reason == reason
    assert got_violations == (violations or [])


def one_point_request(**changes: Any) -> ingest_pb2.IngestRealtimeRequest:
    p = point(0, **changes)
    return ingest_pb2.IngestRealtimeRequest(data_points=[p])


def json_point(**changes: Any) -> dict[str, Any]:
    body = {
        "well_id": "WELL_001",
        "timestamp": "2025-11-06T14:30:00Z",
        "parameter_name": PARAMETER,
        "value": 6750.5,
        "unit": "psi",
    }
    body.update(changes)
    return body


def json_body(*points: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({**top, "data_points": list(points)}).encode()


async def post(rest: httpx.AsyncClient, token: str | None, content: Any) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers |= bearer(token)
    return await post_uploading(rest, REST_REALTIME, content, headers)


def answer_of(response: httpx.Response) -> dict[str, Any]:
    """A 200 body without the fields that differ per call."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body.pop("ingestion_id").startswith("ing_")
    assert isinstance(body.pop("processing_time_ms"), int)
    return body


# --------------------------------------------------------------------------------------------
# Tokens made by hand


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def keyed_with(secret: bytes, digest: str) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, digest).digest()


def hs_with_pem(tenant: str, pem: bytes, alg: str = "HS256", digest: str = "sha256") -> str:
    """Key confusion: HMAC keyed with the issuer's public key PEM, which anyone may read. A
    verifier that hands "the key" to whatever algorithm the header names would accept it."""
    return hand_made({"alg": alg, "typ": "JWT"}, claims_for(tenant), keyed_with(pem, digest))


def swapped_claims(token: str, **overrides: Any) -> str:
    """A genuine token whose payload was changed after signing, signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(overrides)
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


@dataclass(frozen=True, slots=True)
class Attacker:
    """What a token case may use: the victim tenant, a second tenant, the test issuer's minting
    (for cases that need a genuine signature) and the issuer's public PEM."""

    tenant: str
    other: str
    mint: TokenFactory
    pem: bytes


def with_embedded_jwk(attacker: Attacker) -> str:
    """Signed by the attacker's key, which the header carries as a JWK for the verifier to use."""
    key = other_rsa_key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return attacker.mint(attacker.tenant, key=key, headers={"jwk": jwk})


# (case, token from an Attacker, message). Every one is UNAUTHENTICATED invalid_token.
FORGED_TOKENS: list[tuple[str, Callable[[Attacker], str], str]] = [
    (
        "HS256 keyed with the issuer's public PEM",
        lambda a: hs_with_pem(a.tenant, a.pem),
        f"token algorithm 'HS256' is not accepted; use one of {ALGORITHMS}",
    ),
    (
        "HS256 keyed with the PEM without its last newline",
        lambda a: hs_with_pem(a.tenant, a.pem.rstrip(b"\n")),
        f"token algorithm 'HS256' is not accepted; use one of {ALGORITHMS}",
    ),
    (
        "HS512 keyed with the PEM",
        lambda a: hs_with_pem(a.tenant, a.pem, "HS512", "sha512"),
        f"token algorithm 'HS512' is not accepted; use one of {ALGORITHMS}",
    ),
    (
        "RS256 header over an HMAC keyed with the PEM",
        lambda a: hs_with_pem(a.tenant, a.pem, "RS256"),
        BAD_SIGNATURE,
    ),
    (
        "alg nOnE",
        lambda a: hand_made({"alg": "nOnE"}, claims_for(a.tenant), lambda _: b""),
        f"token algorithm 'nOnE' is not accepted; use one of {ALGORITHMS}",
    ),
    (
        "alg NONE",
        lambda a: hand_made({"alg": "NONE"}, claims_for(a.tenant), lambda _: b""),
        f"token algorithm 'NONE' is not accepted; use one of {ALGORITHMS}",
    ),
    (
        "no alg header",
        lambda a: hand_made({"typ": "JWT"}, claims_for(a.tenant), lambda _: b""),
        f"token algorithm None is not accepted; use one of {ALGORITHMS}",
    ),
    (
        "RS256 by another key, unknown kid",
        lambda a: a.mint(a.tenant, key=other_rsa_key(), headers={"kid": "no-such-key"}),
        BAD_SIGNATURE,
    ),
    (
        "RS256 by another key with its public key embedded as jwk",
        with_embedded_jwk,
        BAD_SIGNATURE,
    ),
    (
        "RS256 by another key, jku and x5u naming the signer's key set",
        lambda a: a.mint(
            a.tenant,
            key=other_rsa_key(),
            headers={"jku": "http://127.0.0.1:9/jwks.json", "x5u": "http://127.0.0.1:9/x5u"},
        ),
        BAD_SIGNATURE,
    ),
    (
        "genuine signature, claims switched to another tenant",
        lambda a: swapped_claims(a.mint(a.other), tenant_id=a.tenant),
        BAD_SIGNATURE,
    ),
    (
        "genuine header and claims, signature stripped",
        lambda a: a.mint(a.tenant).rsplit(".", 1)[0] + ".",
        BAD_SIGNATURE,
    ),
    (
        "tenant claim a list holding the tenant",
        lambda a: a.mint(a.tenant, tenant_id=[a.tenant]),
        "token has no tenant claim 'tenant_id'",
    ),
    (
        "tenant claim a number",
        lambda a: a.mint(a.tenant, tenant_id=12345),
        "token has no tenant claim 'tenant_id'",
    ),
    (
        "tenant claim an object",
        lambda a: a.mint(a.tenant, tenant_id={"tenant_id": a.tenant}),
        "token has no tenant claim 'tenant_id'",
    ),
]


@pytest.mark.parametrize(
    ("forge", "message"), [c[1:] for c in FORGED_TOKENS], ids=[c[0] for c in FORGED_TOKENS]
)
async def test_forged_tokens_are_refused(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    other_tenant: str,
    make_token: TokenFactory,
    issuer_pem: bytes,
    db: asyncpg.Connection,
    forge: Callable[[Attacker], str],
    message: str,
) -> None:
    token = forge(Attacker(tenant, other_tenant, make_token, issuer_pem))
    error = await refused(stub.IngestRealtime(one_point_request(), metadata=auth(token)))
    assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "invalid_token", message)
    assert await stored_count(db, tenant) == 0
    assert await stored_count(db, other_tenant) == 0


async def test_key_confusion_token_over_rest_is_401(
    rest: httpx.AsyncClient, tenant: str, issuer_pem: bytes, db: asyncpg.Connection
) -> None:
    response = await post(rest, hs_with_pem(tenant, issuer_pem), json_body(json_point()))
    assert response.status_code == 401, response.text
    assert response.json() == {
        "error": "invalid_token",
        "message": f"token algorithm 'HS256' is not accepted; use one of {ALGORITHMS}",
    }
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert await stored_count(db, tenant) == 0


def rs256_signer(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


# Keys from PEM files have no key id: a token's kid cannot select among them, so every trusted
# key is tried and a string kid, whatever it holds, is ignored; a genuine token is accepted. A
# kid that is not a string makes the header malformed. (case, kid, message or None: accepted)
KIDS: list[tuple[str, Any, str | None]] = [
    ("unknown kid", "no-such-key", None),
    ("path traversal", "../../../../etc/passwd", None),
    ("SQL", "' OR '1'='1'; DROP TABLE x; --", None),
    ("4,000 characters", "k" * 4000, None),
    ("a number", 12345, "access token is malformed"),
    ("an object", {"kid": "nested"}, "access token is malformed"),
    ("null", None, "access token is malformed"),
]


@pytest.mark.parametrize(("kid", "message"), [c[1:] for c in KIDS], ids=[c[0] for c in KIDS])
async def test_a_kid_does_not_choose_among_pem_keys(
    stub: ingest_pb2_grpc.IngestServiceStub,
    rsa_key: rsa.RSAPrivateKey,
    tenant: str,
    db: asyncpg.Connection,
    kid: Any,
    message: str | None,
) -> None:
    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    genuine = hand_made(header, claims_for(tenant), rs256_signer(rsa_key))
    forged = hand_made(header, claims_for(tenant), rs256_signer(other_rsa_key()))
    call = stub.IngestRealtime(one_point_request(), metadata=auth(genuine))
    if message is None:
        response = await call
        assert (response.status, response.accepted_count) == ("success", 1)
    else:
        error = await refused(call)
        assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "invalid_token", message)
    stored = await stored_count(db, tenant)
    assert stored == (1 if message is None else 0)
    error = await refused(stub.IngestRealtime(one_point_request(), metadata=auth(forged)))
    assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "invalid_token", message or BAD_SIGNATURE)
    assert await stored_count(db, tenant) == stored


def unknown_kid_message(kid: str) -> str:
    return (
        f'no key found for the token\'s key id: Unable to find a signing key that matches: "{kid}"'
    )


async def test_jwks_gateway_forged_kids_and_foreign_key_urls(
    gateway_config: GatewayConfig,
    database_url: str,
    redis_url: str,
    tenant: str,
    db: asyncpg.Connection,
) -> None:
    """With keys from a JWKS URL (as in production): unknown kids are refused without making the
    gateway fetch the key set again and again, and the key URLs a token names (jku, x5u) are
    never fetched."""
    issuer_key, attacker_key = other_rsa_key(), other_rsa_key()
    idp, attacker_site = JwksServer(), JwksServer()
    idp.publish(issuer_key, "key-1")
    attacker_site.publish(attacker_key, "evil")
    config = gateway_config.model_copy(update={"auth": AuthConfig(issuer=ISSUER, jwks_url=idp.url)})
    own = Gateway(config, database_url, redis_url)
    await own.start()

    def token(key: rsa.RSAPrivateKey, **headers: Any) -> str:
        return jwt.encode(claims_for(tenant), key, algorithm="RS256", headers=headers)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{own.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            ok = await stub.IngestRealtime(
                one_point_request(), metadata=auth(token(issuer_key, kid="key-1"))
            )
            assert ok.accepted_count == 1
            assert idp.fetches == 1
            for n in range(20):
                kid = f"forged-{n}-{secrets.token_hex(4)}"
                error = await refused(
                    stub.IngestRealtime(
                        one_point_request(), metadata=auth(token(attacker_key, kid=kid))
                    )
                )
                assert_status(
                    error,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "invalid_token",
                    unknown_kid_message(kid),
                )
            # The issuer's kid on the attacker's signature.
            error = await refused(
                stub.IngestRealtime(
                    one_point_request(), metadata=auth(token(attacker_key, kid="key-1"))
                )
            )
            assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "invalid_token", BAD_SIGNATURE)
            # The attacker's key set named in the token.
            error = await refused(
                stub.IngestRealtime(
                    one_point_request(),
                    metadata=auth(
                        token(
                            attacker_key, kid="evil", jku=attacker_site.url, x5u=attacker_site.url
                        )
                    ),
                )
            )
            assert_status(
                error, grpc.StatusCode.UNAUTHENTICATED, "invalid_token", unknown_kid_message("evil")
            )
    finally:
        await own.stop(grace=1)
        idp.close()
        attacker_site.close()
    assert idp.fetches == 1  # 21 unknown kids within the refresh cooldown: no refetch
    assert attacker_site.fetches == 0
    assert await stored_count(db, tenant) == 1


# --------------------------------------------------------------------------------------------
# Tenant ids


def invalid_tenant(shown: str) -> str:
    return f"tenant id {shown} is not valid: it must match {TENANT_PATTERN}"


# (case, tenant claim, how the message shows it). PERMISSION_DENIED unknown_tenant, at the token.
HOSTILE_TENANT_CLAIMS: list[tuple[str, str, str]] = [
    ("Redis hash tag", "{t_other}", "'{t_other}'"),
    ("Redis glob", "a}:*", "'a}:*'"),
    ("CRLF command", f"a\r\nSET {SMUGGLED_KEY} 1", f"'a\\r\\nSET {SMUGGLED_KEY} 1'"),
    ("SQL", "t_x'; DROP SCHEMA public CASCADE; --", '"t_x\'; DROP SCHEMA public CASCADE; --"'),
    ("schema-qualified", "t_x_streams.real_time_parameters", "'t_x_streams.real_time_parameters'"),
    ("5,000 characters", "x" * 5000, "'" + "x" * 60 + "'"),
    ("49 characters", "a" * 49, "'" + "a" * 49 + "'"),
    ("1 character", "a", "'a'"),
    ("upper case", "T_ABC", "'T_ABC'"),
    ("zero-width space", "t_abc\u200b", "'t_abc\\u200b'"),
    ("RTL override", "\u202et_abc", "'\\u202et_abc'"),
    ("Cyrillic lookalike", "t_\u0430bc", "'t_\u0430bc'"),
    ("NUL", "t_abc\x00", "'t_abc\\x00'"),
]


@pytest.mark.parametrize(
    ("claim", "shown"),
    [c[1:] for c in HOSTILE_TENANT_CLAIMS],
    ids=[c[0] for c in HOSTILE_TENANT_CLAIMS],
)
async def test_hostile_tenant_claims_are_refused_at_the_token(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    claim: str,
    shown: str,
) -> None:
    error = await refused(
        stub.IngestRealtime(one_point_request(), metadata=auth(make_token(claim)))
    )
    assert_status(error, grpc.StatusCode.PERMISSION_DENIED, "unknown_tenant", invalid_tenant(shown))
    # Refused before the limits stage: no Redis key was made for it.
    assert await redis.exists(f"limits:{{{claim}}}:requests", SMUGGLED_KEY) == 0
    assert await stored_count(db, tenant) == 0
    await assert_intact(db, tenant)


@pytest.mark.parametrize("ghost", ["ghost", "public", "information_schema"])
async def test_token_of_a_tenant_that_does_not_exist(
    stub: ingest_pb2_grpc.IngestServiceStub,
    rest: httpx.AsyncClient,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    ghost: str,
) -> None:
    """Names that pass the tenant pattern but were never provisioned (including names of
    Postgres' own schemas): refused, and nothing is created for them."""
    name = f"{ghost}_{secrets.token_hex(3)}" if ghost == "ghost" else ghost
    message = f"tenant {name!r} is not provisioned on this gateway"
    before = await refusals_of(db, name, "unknown_tenant")
    try:
        error = await refused(
            stub.IngestRealtime(one_point_request(), metadata=auth(make_token(name)))
        )
        assert_status(error, grpc.StatusCode.PERMISSION_DENIED, "unknown_tenant", message)
        response = await post(rest, make_token(name), json_body(json_point()))
        assert response.status_code == 403, response.text
        assert response.json() == {"error": "unknown_tenant", "message": message}
        await gateway.audit.flush()
        assert await refusals_of(db, name, "unknown_tenant") == before + 2
        assert (
            await db.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname = $1", f"{name}_streams"
            )
            == 0
        )
        assert (
            await db.fetchval("SELECT count(*) FROM welltegra.tenants WHERE tenant_id = $1", name)
            == 0
        )
        assert [k async for k in redis.scan_iter(match=f"realtime:{{{name}}}:*")] == []
        # Refused before the limits stage: no limits state is kept for a tenant that is not.
        assert [k async for k in redis.scan_iter(match=f"limits:{{{name}}}:*")] == []
        await assert_intact(db, tenant)
    finally:
        await forget_keys(redis, name)
        await db.execute("DELETE FROM system_monitoring.audit_log WHERE tenant_id = $1", name)


# Body tenant ids for a token of `tenant`: <own> and <other> are replaced by the tenants' ids.
MISMATCHED_BODY_TENANTS: list[tuple[str, str]] = [
    ("another provisioned tenant", "<other>"),
    ("its hash tag", "{<other>}"),
    ("own id upper-cased", "<OWN>"),
    ("own id with a NUL", "<own>\x00"),
    ("own id with a trailing space", "<own> "),
    ("own id with a zero-width space", "<own>\u200b"),
    ("own id, Cyrillic t", "\u0442<own_tail>"),
]


def body_tenant(template: str, own: str, other: str) -> str:
    return (
        template.replace("<other>", other)
        .replace("<OWN>", own.upper())
        .replace("<own_tail>", own[1:])
        .replace("<own>", own)
    )


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
@pytest.mark.parametrize(
    "template", [c[1] for c in MISMATCHED_BODY_TENANTS], ids=[c[0] for c in MISMATCHED_BODY_TENANTS]
)
async def test_body_naming_another_tenant_is_refused(
    stub: ingest_pb2_grpc.IngestServiceStub,
    rest: httpx.AsyncClient,
    gateway: Gateway,
    tenant: str,
    other_tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    protocol: str,
    template: str,
) -> None:
    named = body_tenant(template, tenant, other_tenant)
    assert named != tenant
    token = make_token(tenant)
    if protocol == "grpc":
        request = one_point_request()
        request.tenant_id = named
        error = await refused(stub.IngestRealtime(request, metadata=auth(token)))
        assert_status(error, grpc.StatusCode.PERMISSION_DENIED, "tenant_mismatch", MISMATCH)
    else:
        response = await post(rest, token, json_body(json_point(), tenant_id=named))
        assert response.status_code == 403, response.text
        assert response.json() == {"error": "tenant_mismatch", "message": MISMATCH}
    await gateway.audit.flush()
    assert await refusals_of(db, tenant, "tenant_mismatch") == 1
    for name in (tenant, other_tenant):
        assert await stored_count(db, name) == 0
        assert await cache_snapshot(redis, name) == {}
    await assert_intact(db, tenant, other_tenant)


# JSON with the tenant twice, or once under each of its proto3 JSON names: the transcoder keeps
# the last, and the gateway still stores for the token's tenant only.
DUPLICATED_TENANT_KEYS: list[tuple[str, str, int]] = [
    ("tenant_id twice, the other tenant's last", '"tenant_id":"<own>","tenant_id":"<other>"', 403),
    ("tenant_id, then tenantId of the other", '"tenant_id":"<own>","tenantId":"<other>"', 403),
    ("tenant_id twice, own last", '"tenant_id":"<other>","tenant_id":"<own>"', 200),
    ("tenantId of the other, then own tenant_id", '"tenantId":"<other>","tenant_id":"<own>"', 200),
]


@pytest.mark.parametrize(
    ("members", "status"),
    [c[1:] for c in DUPLICATED_TENANT_KEYS],
    ids=[c[0] for c in DUPLICATED_TENANT_KEYS],
)
async def test_duplicated_tenant_keys_in_json(
    rest: httpx.AsyncClient,
    tenant: str,
    other_tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    members: str,
    status: int,
) -> None:
    members = members.replace("<own>", tenant).replace("<other>", other_tenant)
    content = f'{{{members},"data_points":[{json.dumps(json_point())}]}}'.encode()
    response = await post(rest, make_token(tenant), content)
    if status == 403:
        assert response.status_code == 403, response.text
        assert response.json() == {"error": "tenant_mismatch", "message": MISMATCH}
        assert await stored_count(db, tenant) == 0
    else:
        assert answer_of(response) == {
            "status": "success",
            "message": "Ingested 1 data point",
            "tenant_id": tenant,
            "accepted_count": 1,
            "rejected_count": 0,
            "duplicate_count": 0,
            "rejections": [],
        }
        assert await stored_count(db, tenant) == 1
    assert await stored_count(db, other_tenant) == 0


# --------------------------------------------------------------------------------------------
# Well ids and other text: accepted within the limits and stored verbatim


# <own> and <other> are replaced by the tenants' ids.
HOSTILE_WELL_IDS: list[tuple[str, str]] = [
    ("SQL: drop table", "W'); DROP TABLE x; --"),
    ("SQL: drop schema public", "W'; DROP SCHEMA public CASCADE; --"),
    ("SQL: quoted identifier", 'W"; DROP TABLE "<own>_streams".real_time_parameters; --'),
    ("SQL: dollar quoting", "$$; DROP TABLE x; $$"),
    ("Redis: close the hash tag, glob", "W}:*"),
    ("Redis: glob characters", "*?[a-z]\\"),
    ("Redis: another tenant's hash tag", "{<other>}"),
    ("Redis: another tenant's whole key", "}:realtime:{<other>}:WELL_001"),
    ("Redis: CRLF inline command", f"W\r\nSET {SMUGGLED_KEY} 1\r\n"),
    (
        "Redis: RESP frame",
        f"*3\r\n$3\r\nSET\r\n${len(SMUGGLED_KEY)}\r\n{SMUGGLED_KEY}\r\n$1\r\n1\r\n",
    ),
    ("128 characters", "W" * 128),
    ("128 four-byte characters", "\U0001f6e2" * 128),
    ("RTL override", "\u202eW_LLEW"),
    ("zero-width characters", "W\u200b\u200c\u200d\u2060\ufeff1"),
    ("combining marks", "W\u0301\u0302\u0303\u0304"),
    ("whitespace only", " \t "),
    ("format strings", "%s%n{0}${x}%(x)s"),
    ("path traversal", "../../../etc/passwd"),
]


def well_for(template: str, own: str, other: str) -> str:
    return template.replace("<own>", own).replace("<other>", other)


@pytest.mark.parametrize(
    "template", [c[1] for c in HOSTILE_WELL_IDS], ids=[c[0] for c in HOSTILE_WELL_IDS]
)
async def test_hostile_well_ids_are_stored_verbatim_under_the_tenants_key(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    other_tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    template: str,
) -> None:
    well = well_for(template, tenant, other_tenant)
    # The other tenant holds the same well, and one more, in its cache.
    seeded = await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(
            data_points=[point(0, 100.0, well=well), point(0, 100.0, well="WELL_001")]
        ),
        metadata=auth(make_token(other_tenant)),
    )
    assert seeded.accepted_count == 2
    before = await cache_snapshot(redis, other_tenant)
    assert len(before) == 2

    response = await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=[point(1, 6750.5, well=well)]),
        metadata=auth(make_token(tenant)),
    )
    assert (response.status, response.accepted_count, response.rejected_count) == ("success", 1, 0)

    rows = await db.fetch(
        f'SELECT tenant_id, well_id, parameter_name FROM "{tenant}_streams".real_time_parameters'
    )
    assert [tuple(r) for r in rows] == [(tenant, well, PARAMETER)]
    key = f"realtime:{{{tenant}}}:{well}:{PARAMETER}".encode()
    after = await cache_snapshot(redis, tenant)
    assert list(after) == [key]
    assert after[key][b"value"] == b"6750.5"
    assert await cache_snapshot(redis, other_tenant) == before
    assert await redis.exists(SMUGGLED_KEY) == 0
    assert await stored_count(db, other_tenant) == 2
    await assert_intact(db, tenant, other_tenant)


async def test_well_ids_are_not_normalised(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
) -> None:
    """Å composed and decomposed, and with a zero-width space: three wells, three keys."""
    wells = ["\u00c5", "A\u030a", "\u00c5\u200b"]
    response = await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=[point(0, well=w) for w in wells]),
        metadata=auth(make_token(tenant)),
    )
    assert response.accepted_count == 3
    stored = await db.fetch(f'SELECT well_id FROM "{tenant}_streams".real_time_parameters')
    assert sorted(r["well_id"] for r in stored) == sorted(wells)
    assert set(await cache_snapshot(redis, tenant)) == {
        f"realtime:{{{tenant}}}:{w}:{PARAMETER}".encode() for w in wells
    }


async def test_injection_in_source_and_agent_id_is_stored_verbatim(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    agent = "agent'); DROP TABLE x; --"
    source = "S'); DELETE FROM welltegra.tenants; --\r\n\u202e"

    async def one() -> AsyncIterator[ingest_pb2.IngestRequest]:
        p = point(0)
        p.source = source
        yield ingest_pb2.IngestRequest(agent_id=agent, batch_sequence=1, data_points=[p])

    response = await stub.Ingest(one(), metadata=auth(make_token(tenant)))
    assert response.accepted_count == 1
    ledger = await db.fetch(f'SELECT agent_id, batch_sequence FROM "{tenant}_streams".batch_ledger')
    assert [tuple(r) for r in ledger] == [(agent, 1)]
    [stored] = [p async for p in gateway.storage.read_points(tenant)]
    assert (stored.well_id, stored.source) == ("WELL_001", source)
    await assert_intact(db, tenant)


async def test_injection_in_parameter_name_is_quarantined_verbatim(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
) -> None:
    parameter = f"{PARAMETER}'; DROP TABLE x; --"
    response = await stub.IngestRealtime(
        one_point_request(parameter=parameter), metadata=auth(make_token(tenant))
    )
    assert (response.status, response.accepted_count, response.rejected_count) == ("partial", 0, 1)
    [rejection] = response.rejections
    assert (rejection.index, rejection.field) == (0, "data_points[0].parameter_name")
    assert rejection.reason.startswith(
        'unknown parameter "wellhead_pressure\'; DROP TABLE x; --"; known parameters: '
    )
    rows = await db.fetch(
        f'SELECT well_id, parameter_name, field FROM "{tenant}_streams".quarantine'
    )
    assert [tuple(r) for r in rows] == [("WELL_001", parameter, "data_points[0].parameter_name")]
    assert await stored_count(db, tenant) == 0
    assert await cache_snapshot(redis, tenant) == {}
    await assert_intact(db, tenant)


# (case, well id): the whole request is refused, one violation.
OVERLONG_WELL_IDS = [
    ("129 characters", "W" * 129),
    ("129 four-byte characters", "\U0001f6e2" * 129),
    ("100,000 characters", "W" * 100_000),
]


@pytest.mark.parametrize(
    "well", [c[1] for c in OVERLONG_WELL_IDS], ids=[c[0] for c in OVERLONG_WELL_IDS]
)
async def test_overlong_well_ids_refuse_the_request(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    well: str,
) -> None:
    request = ingest_pb2.IngestRealtimeRequest(data_points=[point(0), point(1, well=well)])
    error = await refused(stub.IngestRealtime(request, metadata=auth(make_token(tenant))))
    assert_status(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "validation_error",
        "Invalid data schema",
        [("data_points[1].well_id", "must be at most 128 characters")],
    )
    await gateway.audit.flush()
    assert await refusals_of(db, tenant, "validation_error") == 1
    assert await stored_count(db, tenant) == 0
    assert await quarantined_count(db, tenant) == 0
    assert await cache_snapshot(redis, tenant) == {}


async def test_undecodable_well_id_is_not_a_valid_message(
    gateway: Gateway, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    raw = point(0, well="WELL_0X1").SerializeToString().replace(b"WELL_0X1", b"WELL_\xff\xfe1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_unary(REALTIME)
        error = await refused(
            call(encoded_request(tenant, [raw]), metadata=auth(make_token(tenant)))
        )
    assert_status(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "validation_error",
        "request is not a valid IngestRealtimeRequest message: Error parsing message with type"
        " 'welltegra.ingest.v1.IngestRealtimeRequest': String field had bad UTF-8",
    )
    assert await stored_count(db, tenant) == 0


# --------------------------------------------------------------------------------------------
# Numbers and times


INVALID_VALUE = [("data_points[0].value", "must be a finite number")]


@pytest.mark.parametrize(
    "points",
    [
        [point(0, float("inf"))],
        [point(0, float("-inf"))],
        [point(0, -float("inf"))] + [point(i) for i in range(1, 1000)],
    ],
    ids=["+Infinity", "-Infinity", "-Infinity first of 1,000"],
)
async def test_infinite_values_refuse_the_request(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    points: list[ingest_pb2.DataPoint],
) -> None:
    request = ingest_pb2.IngestRealtimeRequest(data_points=points)
    error = await refused(stub.IngestRealtime(request, metadata=auth(make_token(tenant))))
    assert_status(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "validation_error",
        "Invalid data schema",
        INVALID_VALUE,
    )
    assert await stored_count(db, tenant) == 0
    assert await quarantined_count(db, tenant) == 0


STRUCTURAL_TIME = [("data_points[0].timestamp", "must be a valid RFC 3339 time (years 1-9999)")]

# (case, seconds, nanos, rejection reason or None for a structural refusal)
TIMESTAMPS: list[tuple[str, int, int, str | None]] = [
    (
        "9999-12-31T23:59:59Z",
        253402300799,
        0,
        "9999-12-31T23:59:59+00:00 is more than 300s in the future",
    ),
    (
        "9999-12-31T23:59:59.999999999Z",
        253402300799,
        999_999_999,
        "9999-12-31T23:59:59.999999+00:00 is more than 300s in the future",
    ),
    (
        "1969-12-31T23:59:59Z",
        -1,
        0,
        "1969-12-31T23:59:59+00:00 is older than the accepted 3650 days",
    ),
    (
        "0001-01-01T00:00:00Z",
        -62135596800,
        0,
        "0001-01-01T00:00:00+00:00 is older than the accepted 3650 days",
    ),
    ("10000-01-01T00:00:00Z", 253402300800, 0, None),
    ("0000-12-31T23:59:59Z", -62135596801, 0, None),
    ("int64 max seconds", 2**63 - 1, 0, None),
    ("int64 min seconds", -(2**63), 0, None),
    ("negative nanos", 1_762_439_400, -1, None),
    ("a billion nanos", 1_762_439_400, 1_000_000_000, None),
]


@pytest.mark.parametrize(
    ("seconds", "nanos", "reason"), [c[1:] for c in TIMESTAMPS], ids=[c[0] for c in TIMESTAMPS]
)
async def test_timestamps_at_and_past_the_edges(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    seconds: int,
    nanos: int,
    reason: str | None,
) -> None:
    request = one_point_request()
    request.data_points[0].timestamp.seconds = seconds
    request.data_points[0].timestamp.nanos = nanos
    call = stub.IngestRealtime(request, metadata=auth(make_token(tenant)))
    if reason is None:
        error = await refused(call)
        assert_status(
            error,
            grpc.StatusCode.INVALID_ARGUMENT,
            "validation_error",
            "Invalid data schema",
            STRUCTURAL_TIME,
        )
        assert await quarantined_count(db, tenant) == 0
    else:
        response = await call
        assert (response.status, response.message) == (
            "partial",
            "Ingested 0 data points, rejected 1",
        )
        assert (response.accepted_count, response.rejected_count, response.duplicate_count) == (
            0,
            1,
            0,
        )
        assert [(r.index, r.field, r.reason) for r in response.rejections] == [
            (0, "data_points[0].timestamp", reason)
        ]
        rows = await db.fetch(f'SELECT field FROM "{tenant}_streams".quarantine')
        assert [r["field"] for r in rows] == ["data_points[0].timestamp"]
    assert await stored_count(db, tenant) == 0


EDGE_INSTANTS_BUG = pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="bug: asyncpg encodes 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z (Python's"
    " datetime.min/max) as -infinity/infinity, so the quarantine does not keep them as sent",
)


@pytest.mark.parametrize(
    ("seconds", "nanos", "sent"),
    [
        pytest.param(253402300799, 0, "9999-12-31T23:59:59+00:00", id="9999-12-31T23:59:59Z"),
        pytest.param(-1, 0, "1969-12-31T23:59:59+00:00", id="1969-12-31T23:59:59Z"),
        pytest.param(
            -62135596800, 1000, "0001-01-01T00:00:00.000001+00:00", id="0001-01-01T00:00:00.000001Z"
        ),
        pytest.param(
            253402300799,
            999_999_999,
            "9999-12-31T23:59:59.999999+00:00",
            id="9999-12-31T23:59:59.999999999Z",
            marks=EDGE_INSTANTS_BUG,
        ),
        pytest.param(
            -62135596800,
            0,
            "0001-01-01T00:00:00+00:00",
            id="0001-01-01T00:00:00Z",
            marks=EDGE_INSTANTS_BUG,
        ),
    ],
)
async def test_quarantine_keeps_the_time_as_sent(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    seconds: int,
    nanos: int,
    sent: str,
) -> None:
    request = one_point_request()
    request.data_points[0].timestamp.seconds = seconds
    request.data_points[0].timestamp.nanos = nanos
    response = await stub.IngestRealtime(request, metadata=auth(make_token(tenant)))
    assert response.rejected_count == 1
    row = await db.fetchrow(f'SELECT ts, isfinite(ts) AS finite FROM "{tenant}_streams".quarantine')
    assert row["finite"], f"quarantined as {row['ts']!r}"
    assert row["ts"].isoformat() == sent


FINITE_ERROR = {
    "error": "validation_error",
    "message": "Invalid data schema",
    "details": [{"field": "data_points[0].value", "error": "must be a finite number"}],
}
# A one-point body up to its value, for values JSON cannot carry as written.
POINT_PREFIX = (
    '{"data_points":[{"well_id":"W","timestamp":"2025-11-06T14:30:00Z",'
    '"parameter_name":"wellhead_pressure","unit":"psi","value":'
)

# (case, body, status, exact body, or (error, field of details or None) for Envoy's own answers)
REST_NUMBERS_AND_TIMES: list[tuple[str, bytes, int, Any]] = [
    ('"NaN"', json_body(json_point(value="NaN")), 400, FINITE_ERROR),
    ('"Infinity"', json_body(json_point(value="Infinity")), 400, FINITE_ERROR),
    ('"-Infinity"', json_body(json_point(value="-Infinity")), 400, FINITE_ERROR),
    ("bare NaN", (POINT_PREFIX + "NaN}]}").encode(), 400, ("validation_error", None)),
    ("bare Infinity", (POINT_PREFIX + "Infinity}]}").encode(), 400, ("validation_error", None)),
    ("1e400", (POINT_PREFIX + "1e400}]}").encode(), 400, ("validation_error", None)),
    ("-1e400", (POINT_PREFIX + "-1e400}]}").encode(), 400, ("validation_error", None)),
    (
        '"1e400"',
        json_body(json_point(value="1e400")),
        400,
        ("validation_error", "data_points[0].value"),
    ),
    (
        "10000-01-01T00:00:00Z",
        json_body(json_point(timestamp="10000-01-01T00:00:00Z")),
        400,
        ("validation_error", "data_points[0].timestamp"),
    ),
    (
        "9999-12-31T23:59:59-01:00 (year 10000 in UTC)",
        json_body(json_point(timestamp="9999-12-31T23:59:59-01:00")),
        400,
        ("validation_error", "data_points[0].timestamp"),
    ),
    (
        "0001-01-01T00:00:00+01:00 (year 0 in UTC)",
        json_body(json_point(timestamp="0001-01-01T00:00:00+01:00")),
        400,
        ("validation_error", "data_points[0].timestamp"),
    ),
    (
        "9999-12-31T23:59:59Z",
        json_body(json_point(timestamp="9999-12-31T23:59:59Z")),
        200,
        "9999-12-31T23:59:59+00:00 is more than 300s in the future",
    ),
    (
        "1969-12-31T23:59:59Z",
        json_body(json_point(timestamp="1969-12-31T23:59:59Z")),
        200,
        "1969-12-31T23:59:59+00:00 is older than the accepted 3650 days",
    ),
    (
        "0001-01-01T00:00:00Z",
        json_body(json_point(timestamp="0001-01-01T00:00:00Z")),
        200,
        "0001-01-01T00:00:00+00:00 is older than the accepted 3650 days",
    ),
    (
        "NUL escaped in well_id",
        json_body(json_point(well_id="W\u0000x")),
        400,
        {
            "error": "validation_error",
            "message": "Invalid data schema",
            "details": [
                {"field": "data_points[0].well_id", "error": "must not contain NUL characters"}
            ],
        },
    ),
    (
        "lone surrogate in well_id",
        (POINT_PREFIX.replace('"W"', '"\\ud800"') + "1}]}").encode(),
        400,
        ("validation_error", None),
    ),
    (
        "invalid UTF-8 in well_id",
        (POINT_PREFIX + "1}]}").encode().replace(b'"W"', b'"W\xff\xfe"'),
        400,
        ("validation_error", None),
    ),
]


@pytest.mark.parametrize(
    ("content", "status", "expected"),
    [c[1:] for c in REST_NUMBERS_AND_TIMES],
    ids=[c[0] for c in REST_NUMBERS_AND_TIMES],
)
async def test_rest_numbers_times_and_text(
    rest: httpx.AsyncClient,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    content: bytes,
    status: int,
    expected: Any,
) -> None:
    response = await post(rest, make_token(tenant), content)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    if status == 200:
        assert answer_of(response) == {
            "status": "partial",
            "message": "Ingested 0 data points, rejected 1",
            "tenant_id": tenant,
            "accepted_count": 0,
            "rejected_count": 1,
            "duplicate_count": 0,
            "rejections": [{"index": 0, "field": "data_points[0].timestamp", "reason": expected}],
        }
        assert await quarantined_count(db, tenant) == 1
    elif isinstance(expected, dict):
        assert response.json() == expected  # the gateway's answer, exactly
    else:
        # Envoy's own answer: the documented code; its wording is Envoy's.
        body = response.json()
        code, field = expected
        assert body["error"] == code
        assert isinstance(body["message"], str) and body["message"]
        assert set(body) <= {"error", "message", "details"}
        if field is not None:
            assert [d["field"] for d in body["details"]] == [field]
        assert await quarantined_count(db, tenant) == 0
    assert await stored_count(db, tenant) == 0


# --------------------------------------------------------------------------------------------
# Sizes


def padded_request(tenant: str, size: int) -> bytes:
    """A valid IngestRealtimeRequest of exactly ``size`` bytes: one point and an unknown field
    (number 15, which the parser keeps aside) as padding."""
    base = encoded_request(tenant, [point(0).SerializeToString()])
    header = 1 + len(_VarintBytes(size))  # tag byte + length varint (same width either way)
    body = (
        base
        + b"\x7a"
        + _VarintBytes(size - len(base) - header)
        + b"\x00" * (size - len(base) - header)
    )
    assert len(body) == size
    return body


# (case, the message from the tenant's id). Both are refused on their size alone; the first is
# not protobuf at all, so had it been parsed the answer would be INVALID_ARGUMENT.
OVERSIZED: list[tuple[str, Callable[[str], bytes]]] = [
    ("10 MiB + 1 byte, not protobuf", lambda t: b"\xff" * (LIMIT + 1)),
    ("10 MiB + 1 byte, valid protobuf", lambda t: padded_request(t, LIMIT + 1)),
]


@pytest.mark.parametrize("message", [c[1] for c in OVERSIZED], ids=[c[0] for c in OVERSIZED])
async def test_grpc_message_over_10_mib_is_refused_before_parsing(
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    message: Callable[[str], bytes],
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_unary(REALTIME)
        error = await refused(call(message(tenant), metadata=auth(make_token(tenant))))
    assert_status(
        error,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "payload_too_large",
        "message of 10485761 bytes is over the limit of 10485760 bytes",
    )
    assert retry_delay(error) is None  # waiting does not help
    await gateway.audit.flush()
    assert await refusals_of(db, tenant, "payload_too_large") == 1
    assert await stored_count(db, tenant) == 0


async def test_grpc_message_of_exactly_10_mib_is_taken(
    gateway: Gateway, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_unary(
            REALTIME, response_deserializer=ingest_pb2.IngestRealtimeResponse.FromString
        )
        response = await call(padded_request(tenant, LIMIT), metadata=auth(make_token(tenant)))
    assert (response.status, response.accepted_count) == ("success", 1)
    assert await stored_count(db, tenant) == 1


async def test_grpc_message_over_twice_the_limit_is_cut_by_grpc(
    gateway: Gateway, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    """Above 2 × max_message_bytes grpc itself drops the message, before the gateway's code:
    RESOURCE_EXHAUSTED without rich details."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_unary(REALTIME)
        error = await refused(call(b"\xff" * (2 * LIMIT + 1), metadata=auth(make_token(tenant))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max (20971521 vs. 20971520)" in error.details()
    assert "grpc-status-details-bin" not in dict(error.trailing_metadata() or ())
    assert await stored_count(db, tenant) == 0


async def test_100_000_points_in_one_message(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    template = point(0)
    request = ingest_pb2.IngestRealtimeRequest(tenant_id=tenant)
    for i in range(100_000):
        p = request.data_points.add()
        p.CopyFrom(template)
        p.timestamp.nanos = i * 1000
    size = request.ByteSize()  # about 7.8 MB: under the size limit, so the count decides
    error = await refused(stub.IngestRealtime(request, metadata=auth(make_token(tenant))))
    if size <= LIMIT:
        assert_status(
            error,
            grpc.StatusCode.INVALID_ARGUMENT,
            "validation_error",
            "Invalid data schema",
            [("data_points", "must hold 1 to 1000 points, not 100000")],
        )
    else:  # should the points ever grow past 10 MiB
        assert_status(
            error,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "payload_too_large",
            f"message of {size} bytes is over the limit of {LIMIT} bytes",
        )
    assert await stored_count(db, tenant) == 0


PAYLOAD_TOO_LARGE = {"error": "payload_too_large", "message": "Payload Too Large"}


def padded_json(size: int) -> bytes:
    """A valid one-point JSON body of exactly ``size`` bytes (whitespace before the final brace)."""
    body = json_body(json_point())
    padded = body[:-1] + b" " * (size - len(body)) + b"}"
    assert len(padded) == size
    return padded


async def chunked(content: bytes, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The body without Content-Length (chunked transfer encoding)."""
    for start in range(0, len(content), chunk):
        yield content[start : start + chunk]
        await asyncio.sleep(0)


async def test_rest_body_at_and_over_10_mib(
    rest: httpx.AsyncClient, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    token = make_token(tenant)
    taken = await post(rest, token, padded_json(LIMIT))
    assert answer_of(taken)["accepted_count"] == 1
    for content in (padded_json(LIMIT + 1), lambda: chunked(padded_json(LIMIT + 1))):
        response = await post(rest, token, content)
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == PAYLOAD_TOO_LARGE
    hundred_thousand = json_body(
        *(json_point(timestamp=f"2025-11-06T14:30:00.{i:06d}Z") for i in range(100_000))
    )
    assert len(hundred_thousand) > LIMIT  # about 13 MB of JSON
    response = await post(rest, token, hundred_thousand)
    assert response.status_code == 413, response.text
    assert response.json() == PAYLOAD_TOO_LARGE
    assert await stored_count(db, tenant) == 1  # the 10 MiB body's point only


# --------------------------------------------------------------------------------------------
# Known bugs: text with NUL poisons the audit log


async def _nul_in_agent_id(
    stub: ingest_pb2_grpc.IngestServiceStub, tenant: str, mint: TokenFactory
) -> None:
    async def one() -> AsyncIterator[ingest_pb2.IngestRequest]:
        yield ingest_pb2.IngestRequest(
            agent_id="agent\x00", batch_sequence=1, data_points=[point(0)]
        )

    error = await refused(stub.Ingest(one(), metadata=auth(mint(tenant))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _nul_in_kid(
    stub: ingest_pb2_grpc.IngestServiceStub, tenant: str, mint: TokenFactory
) -> None:
    token = mint(tenant, key=other_rsa_key(), headers={"kid": "kid\x00"})
    error = await refused(stub.IngestRealtime(one_point_request(), metadata=auth(token)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("send", "jwks"),
    [(_nul_in_agent_id, False), (_nul_in_kid, True)],
    ids=["NUL in agent_id (any tenant's client)", "NUL in kid (anyone, JWKS gateway)"],
)
async def test_nul_in_audited_text_does_not_stop_the_audit(
    gateway_config: GatewayConfig,
    database_url: str,
    redis_url: str,
    rsa_key: rsa.RSAPrivateKey,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    send: Callable[[ingest_pb2_grpc.IngestServiceStub, str, TokenFactory], Awaitable[None]],
    jwks: bool,
) -> None:
    # Its own gateway: the session's must keep auditing for the other tests.
    # The test issuer's key, published under "key-1": with JWKS only, a kid must match.
    idp = JwksServer()
    idp.publish(rsa_key, "key-1")
    config = gateway_config
    if jwks:
        config = gateway_config.model_copy(
            update={"auth": AuthConfig(issuer=ISSUER, jwks_url=idp.url)}
        )
    own = Gateway(config, database_url, redis_url)
    await own.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{own.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            await send(stub, tenant, make_token)
            genuine = make_token(tenant, headers={"kid": "key-1"})
            await stub.IngestRealtime(one_point_request(), metadata=auth(genuine))
        await asyncio.wait_for(own.audit.flush(), 3)
        accepted = await db.fetchval(
            "SELECT count(*) FROM system_monitoring.audit_log"
            " WHERE tenant_id = $1 AND outcome = 'accepted'",
            tenant,
        )
        assert accepted == 1
    finally:
        await own.stop(grace=1)
        idp.close()
