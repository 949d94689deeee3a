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
    "bad", ['x"; drop schema public; --', "Robert'); DROP TABLE x;--", "a", "1abc"]
)
async def test_sql_shaped_tenant_ids_never_reach_sql(gateway: Gateway, bad: str) -> None:
    with pytest.raises(UnknownTenant, match="is not valid"):
        await gateway.storage.create_tenant(bad)
