"""Every refusal path: the right gRPC status and reason, a clear message, an audit row, and
nothing stored."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.internal.encoder import _VarintBytes
from google.rpc import error_details_pb2, status_pb2

from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import auth, point, stored_count

INJECTION = 'x"; drop schema public; --'
REALTIME = "/welltegra.ingest.v1.IngestService/IngestRealtime"


def rich_status(error: grpc.aio.AioRpcError) -> tuple[str, list[tuple[str, str]]]:
    """The ErrorInfo reason and BadRequest violations the gateway sent with ``error``."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    reason, violations = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    return reason, violations


async def refused_count(db: asyncpg.Connection, reason: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM system_monitoring.audit_log"
        " WHERE outcome = 'refused' AND reason = $1",
        reason,
    )
    return count


def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def unsigned_token(tenant: str) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://issuer.test/",
        "aud": "https://api.welltegra.com",
        "exp": now + 600,
        "scope": "api:ingest",
        "tenant_id": tenant,
    }
    return jwt.encode(claims, None, algorithm="none")


# (case id, how to build the metadata from (tenant, make_token), code, reason, message part)
TOKEN_CASES: list[tuple[str, Any, grpc.StatusCode, str, str]] = [
    (
        "no token",
        lambda t, mk: (),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "no access token",
    ),
    (
        "not bearer",
        lambda t, mk: (("authorization", "Basic abc"),),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "Bearer",
    ),
    (
        "garbage",
        lambda t, mk: auth("not.a.jwt"),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "malformed",
    ),
    (
        "bad signature",
        lambda t, mk: auth(mk(t, key=other_rsa_key())),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "signature",
    ),
    (
        "HS256",
        lambda t, mk: auth(mk(t, key="shared-secret-of-32-bytes-or-more!", algorithm="HS256")),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "HS256",
    ),
    (
        "alg none",
        lambda t, mk: auth(unsigned_token(t)),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "none",
    ),
    (
        "expired",
        lambda t, mk: auth(mk(t, exp=int(time.time()) - 3600)),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "expired",
    ),
    (
        "no exp",
        lambda t, mk: auth(mk(t, exp=None)),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "'exp'",
    ),
    (
        "not yet valid",
        lambda t, mk: auth(mk(t, nbf=int(time.time()) + 3600)),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "not valid yet",
    ),
    (
        "wrong audience",
        lambda t, mk: auth(mk(t, aud="https://other.example")),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "audience",
    ),
    (
        "wrong issuer",
        lambda t, mk: auth(mk(t, iss="https://evil.test/")),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "issuer",
    ),
    (
        "no tenant claim",
        lambda t, mk: auth(mk(t, tenant_id=None)),
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid_token",
        "tenant",
    ),
    (
        "missing scope",
        lambda t, mk: auth(mk(t, scope="api:read")),
        grpc.StatusCode.PERMISSION_DENIED,
        "insufficient_scope",
        "api:ingest",
    ),
    (
        "scope substring",
        lambda t, mk: auth(mk(t, scope="api:ingest_readonly")),
        grpc.StatusCode.PERMISSION_DENIED,
        "insufficient_scope",
        "api:ingest",
    ),
    (
        "injected tenant claim",
        lambda t, mk: auth(mk(INJECTION)),
        grpc.StatusCode.PERMISSION_DENIED,
        "unknown_tenant",
        "not valid",
    ),
    (
        "unprovisioned tenant",
        lambda t, mk: auth(mk("nobody_here")),
        grpc.StatusCode.PERMISSION_DENIED,
        "unknown_tenant",
        "not provisioned",
    ),
]


@pytest.mark.parametrize(
    ("metadata", "code", "reason", "message"),
    [case[1:] for case in TOKEN_CASES],
    ids=[case[0] for case in TOKEN_CASES],
)
async def test_token_refusals(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    metadata: Any,
    code: grpc.StatusCode,
    reason: str,
    message: str,
) -> None:
    before = await refused_count(db, reason)
    # No tenant in the body: the refusal must come from the token alone.
    request = ingest_pb2.IngestRealtimeRequest(data_points=[point(0)])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IngestRealtime(request, metadata=metadata(tenant, make_token))
    assert refused.value.code() == code
    assert message in refused.value.details()
    assert rich_status(refused.value)[0] == reason
    await gateway.audit.flush()
    assert await refused_count(db, reason) == before + 1
    assert await stored_count(db, tenant) == 0


async def test_es256_and_rotated_keys_are_verified(
    gateway: Gateway, make_token: TokenFactory, tenant: str
) -> None:
    # A token signed with an EC key the gateway does not trust is refused, whatever the alg.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.IngestRealtime(
                ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]),
                metadata=auth(make_token(tenant, key=ec_key, algorithm="ES256")),
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("body_tenant", ["someone_else", INJECTION])
async def test_tenant_mismatch(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    body_tenant: str,
) -> None:
    before = await refused_count(db, "tenant_mismatch")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IngestRealtime(
            ingest_pb2.IngestRealtimeRequest(tenant_id=body_tenant, data_points=[point(0)]),
            metadata=auth(make_token(tenant)),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "Token tenant_id does not match request tenant_id"
    assert rich_status(refused.value)[0] == "tenant_mismatch"
    await gateway.audit.flush()
    assert await refused_count(db, "tenant_mismatch") == before + 1
    assert await stored_count(db, tenant) == 0
    assert await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'public'") == 1


def encoded_request(tenant: str, points: list[bytes]) -> bytes:
    body = ingest_pb2.IngestRealtimeRequest(tenant_id=tenant).SerializeToString()
    for raw in points:
        body += b"\x12" + _VarintBytes(len(raw)) + raw  # field 2 (data_points), length-delimited
    return body


def string_value_point() -> bytes:
    """A DataPoint whose value (field 4, a double) is sent as the string "abc"."""
    without_value = point(3)
    without_value.ClearField("value")
    return without_value.SerializeToString() + b"\x22\x03abc"


def many_points(n: int) -> list[bytes]:
    return [point(i).SerializeToString() for i in range(n)]


def nan_point() -> bytes:
    return point(0, value=float("nan")).SerializeToString()


def missing_value_point() -> bytes:
    p = point(0)
    p.ClearField("value")
    return p.SerializeToString()


def nul_well_point() -> bytes:
    return point(0, well="WELL\x00001").SerializeToString()


def bad_quality_point() -> bytes:
    p = point(0)
    p.quality_code = "EXCELLENT"
    return p.SerializeToString()


STRUCTURE_CASES: list[tuple[str, Any, tuple[str, str] | None]] = [
    (
        "1001 points",
        lambda: many_points(1001),
        ("data_points", "must hold 1 to 1000 points, not 1001"),
    ),
    ("no points", lambda: [], ("data_points", "must hold 1 to 1000 points, not 0")),
    (
        "string for number",
        lambda: [*many_points(3), string_value_point()],
        ("data_points[3].value", "must be a number"),
    ),
    ("missing value", lambda: [missing_value_point()], ("data_points[0].value", "is required")),
    ("NaN value", lambda: [nan_point()], ("data_points[0].value", "must be a finite number")),
    (
        "NUL in well id",
        lambda: [nul_well_point()],
        ("data_points[0].well_id", "must not contain NUL characters"),
    ),
    (
        "unknown quality code",
        lambda: [bad_quality_point()],
        ("data_points[0].quality_code", "must be one of GOOD, BAD, UNCERTAIN"),
    ),
]


@pytest.mark.parametrize(
    ("points", "violation"), [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES]
)
async def test_structural_errors_refuse_the_whole_request(
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    points: Any,
    violation: tuple[str, str],
) -> None:
    before = await refused_count(db, "validation_error")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        raw_call = channel.unary_unary(
            REALTIME, response_deserializer=ingest_pb2.IngestRealtimeResponse.FromString
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw_call(encoded_request(tenant, points()), metadata=auth(make_token(tenant)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, violations = rich_status(refused.value)
    assert reason == "validation_error"
    assert violation in violations
    await gateway.audit.flush()
    assert await refused_count(db, "validation_error") == before + 1
    assert await stored_count(db, tenant) == 0


async def test_bytes_that_are_not_protobuf(
    gateway: Gateway, tenant: str, make_token: TokenFactory
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        raw_call = channel.unary_unary(REALTIME)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw_call(b"\xff\xff\xff\xff\x0f garbage", metadata=auth(make_token(tenant)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid IngestRealtimeRequest" in refused.value.details()


async def test_stream_batch_without_identity_is_refused(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    async def one() -> Any:
        yield ingest_pb2.IngestRequest(data_points=[point(0)])

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Ingest(one(), metadata=auth(make_token(tenant)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("agent_id", "is required") in rich_status(refused.value)[1]
    assert ("batch_sequence", "must be 1 or more") in rich_status(refused.value)[1]
    assert await stored_count(db, tenant) == 0


async def test_domain_errors_reject_single_points_into_quarantine(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    future = point(0)
    future.timestamp.GetCurrentTime()
    future.timestamp.seconds += 3600
    request = ingest_pb2.IngestRealtimeRequest(
        tenant_id=tenant,
        data_points=[
            point(0, 6750.5),
            point(1, 5, parameter="mud_weight", unit="ppg"),
            point(2, 5, unit="klbs"),
            point(3, 20_000),
            point(4, 1200, unit="bar"),  # 17,404 psi: out of range after conversion
            future,
            point(6, 14_000),
        ],
    )
    response = await stub.IngestRealtime(request, metadata=auth(make_token(tenant)))
    assert response.status == "partial"
    assert (response.accepted_count, response.rejected_count) == (2, 5)
    assert [(r.index, r.field) for r in response.rejections] == [
        (1, "data_points[1].parameter_name"),
        (2, "data_points[2].unit"),
        (3, "data_points[3].value"),
        (4, "data_points[4].value"),
        (5, "data_points[5].timestamp"),
    ]
    assert "unknown parameter 'mud_weight'" in response.rejections[0].reason
    assert "20000 psi is outside the valid range 0..15000 psi" in response.rejections[2].reason
    quarantined = await db.fetch(
        f'SELECT point_index FROM "{tenant}_streams".quarantine ORDER BY point_index'
    )
    assert [row["point_index"] for row in quarantined] == [1, 2, 3, 4, 5]
    assert await stored_count(db, tenant) == 2
    await gateway.audit.flush()
    row = await db.fetchrow(
        "SELECT outcome, accepted_count, rejected_count FROM system_monitoring.audit_log"
        " WHERE ingestion_id = $1",
        response.ingestion_id,
    )
    assert tuple(row) == ("partial", 2, 5)
