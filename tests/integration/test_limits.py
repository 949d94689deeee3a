"""Per-tenant limits in Redis: each limit exceeded and refused with its reason and exact wait,
a retry after that wait admitted, the limits shared by two gateways, and the in-process
fallback while Redis is away."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from ingest_service.config import GatewayConfig
from ingest_service.envoy_front import EnvoyFront
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from ..proxy import CuttableProxy
from .test_ingest import auth, point, stored_count
from .test_refusals import rich_status


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


async def call(stub: ingest_pb2_grpc.IngestServiceStub, token: str, offset: int = 0) -> None:
    await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=[point(offset)]), metadata=auth(token)
    )


async def refused_count(db: asyncpg.Connection, tenant: str, reason: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM system_monitoring.audit_log"
        " WHERE tenant_id = $1 AND outcome = 'refused' AND reason = $2",
        tenant,
        reason,
    )
    return count


async def test_request_rate_burst_refusal_and_honoured_retry(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    await gateway.storage.set_limit_overrides(tenant, {"requests_per_minute": 30})
    token = make_token(tenant)
    for i in range(30):  # the burst: a minute's worth at once
        await call(stub, token, i)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(stub, token, 30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "30 requests/minute limit exceeded"
    assert rich_status(refused.value)[0] == "rate_limit_exceeded"
    wait = retry_delay(refused.value)
    assert wait is not None and 0 < wait <= 2.0  # one request every 2 s after the burst
    await gateway.audit.flush()
    assert await refused_count(db, tenant, "rate_limit_exceeded") == 1
    await asyncio.sleep(wait + 0.05)
    await call(stub, token, 31)  # honouring RetryInfo is enough
    assert await stored_count(db, tenant) == 31


def ten_batches(first: int = 1) -> AsyncIterator[ingest_pb2.IngestRequest]:
    async def batches() -> AsyncIterator[ingest_pb2.IngestRequest]:
        for seq in range(first, first + 10):
            yield ingest_pb2.IngestRequest(
                agent_id="a", batch_sequence=seq, data_points=[point(seq)]
            )

    return batches()


def refused_batch(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return info.reason, info.metadata["batch_index"]


async def test_a_stream_is_one_request_and_each_batch_counts_its_bytes(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    await gateway.storage.set_limit_overrides(tenant, {"requests_per_minute": 2})
    token = make_token(tenant)
    # An agent's live stream carries a batch every linger: all ten pass as one request.
    for first in (1, 11):
        await stub.Ingest(ten_batches(first), metadata=auth(token))
    assert await stored_count(db, tenant) == 20
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Ingest(ten_batches(21), metadata=auth(token))
    assert refused_batch(refused.value) == ("rate_limit_exceeded", "1")

    # The daily volume is charged batch by batch, inside the stream.
    other = f"{tenant}_v"
    await gateway.storage.create_tenant(other)
    try:
        size = ingest_pb2.IngestRequest(
            agent_id="a", batch_sequence=1, data_points=[point(1)]
        ).ByteSize()
        await gateway.storage.set_limit_overrides(other, {"bytes_per_day": size * 5 + size // 2})
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await stub.Ingest(ten_batches(), metadata=auth(make_token(other)))
        assert refused_batch(over.value) == ("daily_volume_exceeded", "6")
        assert await stored_count(db, other) == 5
    finally:
        await gateway.audit.flush()
        await gateway.storage.drop_tenant(other)
        await db.execute("DELETE FROM system_monitoring.audit_log WHERE tenant_id = $1", other)


async def test_message_size_is_refused_before_parsing(
    gateway: Gateway, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    await gateway.storage.set_limit_overrides(tenant, {"max_message_bytes": 2000})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        raw_call = channel.unary_unary("/welltegra.ingest.v1.IngestService/IngestRealtime")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # 3,000 bytes that are not even protobuf: refused on size, never parsed.
            await raw_call(b"\xff" * 3000, metadata=auth(make_token(tenant)))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_status(refused.value)[0] == "payload_too_large"
    assert retry_delay(refused.value) is None  # waiting does not help
    await gateway.audit.flush()
    assert await refused_count(db, tenant, "payload_too_large") == 1


async def test_daily_volume(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    one = ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]).ByteSize()
    await gateway.storage.set_limit_overrides(tenant, {"bytes_per_day": 3 * one})
    token = make_token(tenant)
    for i in range(3):
        await call(stub, token, i)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(stub, token, 3)
    assert rich_status(refused.value)[0] == "daily_volume_exceeded"
    wait = retry_delay(refused.value)
    assert wait is not None and 0 < wait <= 86400  # until the next UTC midnight
    await gateway.audit.flush()
    assert await refused_count(db, tenant, "daily_volume_exceeded") == 1
    assert await stored_count(db, tenant) == 3


async def test_two_gateways_share_the_limits(
    gateway_config: GatewayConfig,
    gateway: Gateway,
    database_url: str,
    redis_url: str,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    await gateway.storage.set_limit_overrides(tenant, {"requests_per_minute": 6})
    second = Gateway(gateway_config, database_url, redis_url)
    await second.start()
    token = make_token(tenant)
    admitted = refused = 0
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{g.port}") for g in (gateway, second)]
        stubs = [ingest_pb2_grpc.IngestServiceStub(c) for c in channels]
        for i in range(12):  # alternate between the two gateways
            try:
                await call(stubs[i % 2], token, i)
                admitted += 1
            except grpc.aio.AioRpcError as error:
                assert rich_status(error)[0] == "rate_limit_exceeded"
                refused += 1
        for channel in channels:
            await channel.close()
    finally:
        await second.stop(grace=1)
    assert (admitted, refused) == (6, 6)
    assert await stored_count(db, tenant) == 6


def fallback_active(gateway: Gateway) -> float | None:
    return gateway.metrics.registry.get_sample_value("welltegra_gateway_limits_fallback_active")


async def test_redis_outage_falls_back_in_process_and_recovers(
    gateway_config: GatewayConfig,
    gateway: Gateway,
    database_url: str,
    redis_url: str,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    await gateway.storage.set_limit_overrides(tenant, {"requests_per_minute": 3})
    proxy, url_template = CuttableProxy.for_redis(redis_url)
    await proxy.start()
    own = Gateway(gateway_config, database_url, url_template.format(port=proxy.port))
    await own.start()
    token = make_token(tenant)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{own.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            await call(stub, token, 0)  # through Redis
            assert fallback_active(own) == 0
            proxy.freeze()  # Redis slower than 50 ms: every command times out
            await call(stub, token, 1)
            await call(stub, token, 2)
            await call(stub, token, 3)
            assert fallback_active(own) == 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(stub, token, 4)  # the in-process buckets hold the same limit
            assert rich_status(refused.value)[0] == "rate_limit_exceeded"
            await proxy.restore()
            await asyncio.sleep(1.2)  # Redis is tried again after a second
            # Redis counted only the first call (the fallback's are this process's own), so
            # it admits this one: the limits are Redis' again.
            await call(stub, token, 5)
            assert fallback_active(own) == 0
            assert own.limits_fallback_episodes == 1
    finally:
        await own.stop(grace=1)
        await proxy.cut()


async def test_rest_client_gets_429_with_retry_after_and_413(
    tmp_path: Path,
    gateway: Gateway,
    envoy_front: EnvoyFront,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    await gateway.storage.set_limit_overrides(
        tenant, {"requests_per_minute": 2, "max_message_bytes": 5000}
    )
    context = ssl.create_default_context(cafile=str(envoy_front.certificate))
    headers = {"authorization": f"Bearer {make_token(tenant)}"}
    body = {
        "data_points": [
            {
                "well_id": "W",
                "timestamp": "2025-11-06T14:30:00Z",
                "parameter_name": "wellhead_pressure",
                "value": 1.0,
                "unit": "psi",
            }
        ]
    }
    async with httpx.AsyncClient(
        base_url=f"https://localhost:{envoy_front.port}", verify=context, timeout=30
    ) as client:
        big = {"data_points": [dict(body["data_points"][0], source="S" * 6000)]}
        too_big = await client.post("/v1/ingest/realtime", json=big, headers=headers)
        assert too_big.status_code == 413, too_big.text
        assert too_big.json()["error"] == "payload_too_large"
        statuses = [
            (await client.post("/v1/ingest/realtime", json=body, headers=headers)).status_code
            for _ in range(2)
        ]
        assert statuses == [200, 200]
        limited = await client.post("/v1/ingest/realtime", json=body, headers=headers)
    assert limited.status_code == 429, limited.text
    answer = limited.json()
    assert answer["error"] == "rate_limit_exceeded"
    assert answer["message"] == "2 requests/minute limit exceeded"
    assert 1 <= answer["retry_after_seconds"] <= 30
    assert limited.headers["retry-after"] == str(answer["retry_after_seconds"])
