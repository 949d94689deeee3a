"""Storage details: partitions ahead and on demand, idempotent migrations, the cache keeping
the newest value, and SQL-shaped tenant ids never reaching SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from redis import asyncio as aioredis

from ingest_service.errors import UnknownTenant
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import auth, point


async def partition_days(db: asyncpg.Connection, tenant: str) -> set[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = $1",
        f"{tenant}_streams",
    )
    return {row["relname"].removeprefix("real_time_parameters_p") for row in rows}


async def test_partitions_are_created_ahead_and_on_demand(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    today = datetime.now(UTC).date()
    ahead = {f"{today + timedelta(days=n):%Y%m%d}" for n in range(-1, 3)}
    assert ahead <= await partition_days(db, tenant)
    # A backfill from 2025-11-06 lands in a partition made for it.
    await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]), metadata=auth(make_token(tenant))
    )
    assert "20251106" in await partition_days(db, tenant)
    # Migrations and tenant schemas apply again without harm (every gateway start runs them).
    await gateway.storage.migrate()
    assert await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".real_time_parameters') == 1


async def test_partitions_are_utc_days(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    database_url: str,
) -> None:
    # 23:30Z and 01:00Z the next day belong to different UTC days, whatever the server's or
    # the reader's time zone; read them from a session in New York to be sure.
    late, early = point(9 * 3600), point(10 * 3600 + 1800)  # 2025-11-06T23:30Z, 11-07T01:00Z
    await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=[late, early]),
        metadata=auth(make_token(tenant)),
    )
    conn = await asyncpg.connect(database_url, server_settings={"timezone": "America/New_York"})
    try:
        rows = await conn.fetch(
            "SELECT tableoid::regclass::text AS part, ts"
            f' FROM "{tenant}_streams".real_time_parameters ORDER BY ts'
        )
    finally:
        await conn.close()
    assert [r["part"].rsplit("_p", 1)[-1] for r in rows] == ["20251106", "20251107"]


async def test_cache_keeps_the_newest_value(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    redis_url: str,
) -> None:
    token = make_token(tenant)
    for offset, value in ((60, 7000.0), (0, 6000.0)):  # newer first, then a late older point
        await stub.IngestRealtime(
            ingest_pb2.IngestRealtimeRequest(data_points=[point(offset, value)]),
            metadata=auth(token),
        )
    redis = aioredis.Redis.from_url(redis_url)
    try:
        cached = await redis.hgetall(f"realtime:{{{tenant}}}:WELL_001:wellhead_pressure")
    finally:
        await redis.aclose()
    assert float(cached[b"value"]) == 7000.0
    assert cached[b"unit"] == b"psi" and cached[b"quality"] == b"GOOD"


@pytest.mark.parametrize(
    "bad", ['x"; drop schema public; --', "Robert'); DROP TABLE x;--", "a", "1abc", "pg_probe"]
)
async def test_sql_shaped_tenant_ids_never_reach_sql(gateway: Gateway, bad: str) -> None:
    with pytest.raises(UnknownTenant, match="is not valid"):
        await gateway.storage.create_tenant(bad)
