"""Historical batches (``IngestRequest.historical``): an agent's backlog, replayed after an outage,
is stored like any batch but never touches the latest-value cache; the flag arrives either set
in the message or appended to a stored batch's bytes, as the agent's backlog lane does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from redis import asyncio as aioredis

from ingest_service.cache import cache_key
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import BASE, auth, point, stream_of

INGEST = "/welltegra.ingest.v1.IngestService/Ingest"
WELL, PARAMETER = "WELL_001", "wellhead_pressure"
# Far above the cache's 300 s TTL: a key still this long-lived was not written again.
MARKED_TTL = 10_000
# What the agent's backlog lane appends to a stored batch (protobuf merges concatenations).
HISTORICAL_SUFFIX = ingest_pb2.IngestRequest(historical=True).SerializeToString()


@pytest.fixture
async def redis(redis_url: str, tenant: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.delete(cache_key(tenant, WELL, PARAMETER))
        await client.aclose()


async def raw_stream(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def ingest_raw(gateway: Gateway, token: str, *batches: bytes) -> ingest_pb2.IngestResponse:
    """An Ingest call with each batch sent as the exact bytes given."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.stream_unary(
            INGEST, response_deserializer=ingest_pb2.IngestResponse.FromString
        )
        response: ingest_pb2.IngestResponse = await call(
            raw_stream(list(batches)), metadata=auth(token)
        )
    return response


async def audited_lanes(
    gateway: Gateway, db: asyncpg.Connection, tenant: str
) -> list[tuple[int, bool]]:
    await gateway.audit.flush()
    rows = await db.fetch(
        "SELECT batch_sequence, historical FROM system_monitoring.audit_log"
        " WHERE tenant_id = $1 AND action = 'Ingest' ORDER BY batch_sequence",
        tenant,
    )
    return [(row[0], row[1]) for row in rows]


async def test_a_historical_batch_is_stored_but_never_touches_the_cache(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    redis: aioredis.Redis,
    db: asyncpg.Connection,
) -> None:
    token = make_token(tenant)
    key = cache_key(tenant, WELL, PARAMETER)
    live = ingest_pb2.IngestRequest(
        agent_id="agent-h", batch_sequence=1, data_points=[point(0, value=1000.0)]
    )
    await stub.Ingest(stream_of([live]), metadata=auth(token))
    cached = await redis.hgetall(key)
    assert float(cached[b"value"]) == 1000.0
    await redis.expire(key, MARKED_TTL)

    # Newer than the cached value: a live batch would replace it, a historical one must not.
    backlog = ingest_pb2.IngestRequest(
        agent_id="agent-h",
        batch_sequence=2,
        historical=True,
        data_points=[point(60, value=2000.0), point(120, value=3000.0)],
    )
    response = await stub.Ingest(stream_of([backlog]), metadata=auth(token))
    assert response.batches[0].accepted_count == 2
    assert await redis.hgetall(key) == cached
    assert await redis.ttl(key) > 300

    stored = [(p.timestamp, p.value) async for p in gateway.storage.read_points(tenant)]
    assert [value for _, value in stored] == [1000.0, 2000.0, 3000.0]
    assert stored[2][0] == BASE.replace(minute=32)

    # The same lane's next live batch still updates the cache: only the flag held it back.
    newest = ingest_pb2.IngestRequest(
        agent_id="agent-h", batch_sequence=3, data_points=[point(180, value=4000.0)]
    )
    await stub.Ingest(stream_of([newest]), metadata=auth(token))
    assert float((await redis.hgetall(key))[b"value"]) == 4000.0
    assert await audited_lanes(gateway, db, tenant) == [(1, False), (2, True), (3, False)]


async def test_the_flag_appended_to_stored_bytes_is_seen(
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    redis: aioredis.Redis,
    db: asyncpg.Connection,
) -> None:
    token = make_token(tenant)
    key = cache_key(tenant, WELL, PARAMETER)
    await ingest_raw(
        gateway,
        token,
        ingest_pb2.IngestRequest(
            agent_id="agent-b", batch_sequence=1, data_points=[point(0, value=1000.0)]
        ).SerializeToString(),
    )
    cached = await redis.hgetall(key)
    assert float(cached[b"value"]) == 1000.0

    # Sealed by the agent without the flag; replayed from its backlog with the flag appended.
    stored = ingest_pb2.IngestRequest(
        agent_id="agent-b", batch_sequence=2, data_points=[point(60, value=2000.0)]
    ).SerializeToString()
    assert not ingest_pb2.IngestRequest.FromString(stored).historical
    response = await ingest_raw(gateway, token, stored + HISTORICAL_SUFFIX)

    [result] = response.batches
    assert (result.batch_sequence, result.accepted_count) == (2, 1)
    assert await redis.hgetall(key) == cached
    assert await audited_lanes(gateway, db, tenant) == [(1, False), (2, True)]
    assert [p.value async for p in gateway.storage.read_points(tenant)] == [1000.0, 2000.0]

    # Replayed again (its acknowledgement was lost): a duplicate, still historical.
    again = await ingest_raw(gateway, token, stored + HISTORICAL_SUFFIX)
    assert again.batches[0].duplicate_batch
    assert await audited_lanes(gateway, db, tenant) == [(1, False), (2, True), (2, True)]


async def test_historical_batches_and_points_are_counted(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    def sample(name: str, **labels: str) -> float:
        found = gateway.metrics.registry.get_sample_value(
            f"welltegra_gateway_{name}", {"tenant": tenant, **labels}
        )
        return found or 0.0

    backlog = ingest_pb2.IngestRequest(
        agent_id="agent-m",
        batch_sequence=1,
        historical=True,
        data_points=[point(0), point(1), point(2, value=-5.0)],
    )
    live = ingest_pb2.IngestRequest(agent_id="agent-m", batch_sequence=2, data_points=[point(3)])
    await stub.Ingest(stream_of([backlog, live, backlog]), metadata=auth(make_token(tenant)))

    assert sample("historical_batches_total", outcome="partial") == 1
    assert sample("historical_batches_total", outcome="duplicate") == 1
    assert sample("historical_batches_total", outcome="accepted") == 0
    assert sample("historical_points_total", outcome="accepted") == 2
    assert sample("historical_points_total", outcome="rejected") == 2  # reported again
    assert sample("historical_points_total", outcome="duplicate") == 2
    # The live batch counts among all requests and points, not among the historical ones.
    assert sample("requests_total", rpc="Ingest", outcome="accepted") == 1
    assert sample("points_total", outcome="accepted") == 3
