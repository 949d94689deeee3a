"""The Ingest stream and IngestRealtime against a real gateway, Postgres and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from redis import asyncio as aioredis

from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory

BASE = datetime(2025, 11, 6, 14, 30, tzinfo=UTC)


def point(
    offset_s: int,
    value: float = 6750.5,
    parameter: str = "wellhead_pressure",
    unit: str = "psi",
    well: str = "WELL_001",
) -> ingest_pb2.DataPoint:
    ts = Timestamp()
    ts.FromDatetime(BASE + timedelta(seconds=offset_s))
    return ingest_pb2.DataPoint(
        well_id=well,
        timestamp=ts,
        parameter_name=parameter,
        value=value,
        unit=unit,
        quality_code="GOOD",
        source="SCADA_OPC_UA",
    )


def batches(count: int, size: int, agent: str = "agent-1") -> list[ingest_pb2.IngestRequest]:
    return [
        ingest_pb2.IngestRequest(
            agent_id=agent,
            batch_sequence=seq,
            data_points=[point(seq * 10_000 + i, value=1000 + i) for i in range(size)],
        )
        for seq in range(1, count + 1)
    ]


async def stream_of(
    items: list[ingest_pb2.IngestRequest],
) -> AsyncIterator[ingest_pb2.IngestRequest]:
    for item in items:
        yield item


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def stored_count(db: asyncpg.Connection, tenant: str) -> int:
    count: int = await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".real_time_parameters')
    return count


async def test_stream_commits_every_batch(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    response = await stub.Ingest(stream_of(batches(5, 200)), metadata=auth(make_token(tenant)))
    assert [b.batch_sequence for b in response.batches] == [1, 2, 3, 4, 5]
    assert response.accepted_count == 1000
    assert response.duplicate_count == response.rejected_count == 0
    assert await stored_count(db, tenant) == 1000
    ledger = await db.fetch(
        f'SELECT batch_sequence, accepted_count FROM "{tenant}_streams".batch_ledger ORDER BY 1'
    )
    assert [(r[0], r[1]) for r in ledger] == [(s, 200) for s in range(1, 6)]
    origin = await db.fetch(
        f'SELECT DISTINCT agent_id, batch_sequence FROM "{tenant}_streams".real_time_parameters'
        " ORDER BY 2"
    )
    assert [tuple(r) for r in origin] == [("agent-1", s) for s in range(1, 6)]


async def test_resent_batch_reports_its_rejections_again_without_writing(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    batch = ingest_pb2.IngestRequest(
        agent_id="agent-r", batch_sequence=7, data_points=[point(0), point(1, value=-5.0)]
    )
    first = await stub.Ingest(stream_of([batch]), metadata=auth(make_token(tenant)))
    again = await stub.Ingest(stream_of([batch]), metadata=auth(make_token(tenant)))
    assert (first.accepted_count, first.rejected_count, first.duplicate_count) == (1, 1, 0)
    result = again.batches[0]
    assert result.duplicate_batch
    assert (result.accepted_count, result.rejected_count, result.duplicate_count) == (0, 1, 1)
    assert [r.field for r in result.rejections] == ["data_points[1].value"]
    assert await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".quarantine') == 1


async def test_broken_stream_keeps_committed_batches_and_resend_is_duplicate(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    all_batches = batches(6, 100)
    token = make_token(tenant)

    hold = asyncio.Event()

    async def three_then_hang() -> AsyncIterator[ingest_pb2.IngestRequest]:
        for item in all_batches[:3]:
            yield item
        await hold.wait()  # never set: the stream stays open until it is cut

    call = stub.Ingest(three_then_hang(), metadata=auth(token))
    for _ in range(500):
        if await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".batch_ledger') == 3:
            break
        await asyncio.sleep(0.01)
    call.cancel()  # the agent dies mid-stream
    with pytest.raises(asyncio.CancelledError):
        await call
    assert call.cancelled()
    assert await stored_count(db, tenant) == 300

    response = await stub.Ingest(stream_of(all_batches), metadata=auth(token))
    by_seq = {b.batch_sequence: b for b in response.batches}
    assert [by_seq[s].duplicate_batch for s in range(1, 7)] == [True] * 3 + [False] * 3
    assert [by_seq[s].duplicate_count for s in range(1, 4)] == [100] * 3
    assert response.accepted_count == 300
    assert await stored_count(db, tenant) == 600

    again = await stub.Ingest(stream_of(all_batches), metadata=auth(token))
    assert again.accepted_count == 0 and again.duplicate_count == 600
    assert await stored_count(db, tenant) == 600


async def test_same_points_by_another_path_are_stored_once(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    token = make_token(tenant)
    first = await stub.Ingest(stream_of(batches(1, 50, agent="a")), metadata=auth(token))
    assert first.accepted_count == 50
    # Same points from another agent (new ledger key) and by the REST-shaped call.
    second = await stub.Ingest(stream_of(batches(1, 50, agent="b")), metadata=auth(token))
    assert second.accepted_count == 0 and second.duplicate_count == 50
    assert not second.batches[0].duplicate_batch
    realtime = await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(
            tenant_id=tenant, data_points=batches(1, 50)[0].data_points
        ),
        metadata=auth(token),
    )
    assert realtime.accepted_count == 0 and realtime.duplicate_count == 50
    assert await stored_count(db, tenant) == 50


async def test_realtime_spec_example_returns_documented_fields(
    gateway: Gateway,
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    redis_url: str,
) -> None:
    request = ingest_pb2.IngestRealtimeRequest(
        tenant_id=tenant,
        data_points=[
            point(0, 6750.5),
            point(0, 215.3, "hookload", "klbs"),
            point(0, 100, "downhole_temperature", "degC"),
        ],
    )
    request.ingestion_timestamp.FromDatetime(BASE)
    response = await stub.IngestRealtime(request, metadata=auth(make_token(tenant)))
    assert response.status == "success"
    assert response.message == "Ingested 3 data points"
    assert response.tenant_id == tenant
    assert response.ingestion_id.startswith("ing_")
    assert (response.accepted_count, response.rejected_count) == (3, 0)
    assert response.processing_time_ms >= 0
    [row] = [
        p async for p in gateway.storage.read_points(tenant, parameter_name="downhole_temperature")
    ]
    assert row.unit == "degF" and row.value == pytest.approx(212.0)
    assert (row.original_value, row.original_unit) == (100.0, "degC")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        cached = await redis.hgetall(f"realtime:{{{tenant}}}:WELL_001:wellhead_pressure")
        assert float(cached[b"value"]) == 6750.5
        assert 0 < await redis.ttl(f"realtime:{{{tenant}}}:WELL_001:wellhead_pressure") <= 300
    finally:
        await redis.aclose()
