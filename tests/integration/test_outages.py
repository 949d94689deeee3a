"""Outages of the gateway's dependencies: health follows Postgres, a Redis outage never fails
an ingest, and both recover by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf.json_format import MessageToJson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingest_service.config import GatewayConfig
from ingest_service.envoy_front import EnvoyFront
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from ..proxy import CuttableProxy
from .test_ingest import auth, point
from .test_refusals import rich_status


async def health_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="welltegra.ingest.v1.IngestService"), timeout=5
        )
    return int(response.status)


async def wait_for_health(port: int, wanted: int, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.2)):
        if await health_status(port) == wanted:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)}")


@contextlib.asynccontextmanager
async def behind_proxy(
    config: GatewayConfig, database_url: str, **storage: timedelta
) -> AsyncIterator[tuple[Gateway, CuttableProxy]]:
    """A gateway (with ``storage`` settings changed) that reaches Postgres through a proxy
    the test can cut or freeze; both are stopped afterwards."""
    proxy, url_template = CuttableProxy.for_postgres(database_url)
    await proxy.start()
    settings = config.model_copy(update={"storage": config.storage.model_copy(update=storage)})
    gateway = Gateway(settings, url_template.format(port=proxy.port), None)
    try:
        await gateway.start()
        yield gateway, proxy
    finally:
        await proxy.cut()
        await gateway.stop(grace=1)


async def test_health_follows_postgres_and_ingest_fails_retryably(
    gateway_config: GatewayConfig,
    database_url: str,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    async with behind_proxy(gateway_config, database_url) as (proxied, proxy):
        assert await health_status(proxied.port) == health_pb2.HealthCheckResponse.SERVING
        await proxy.cut()
        await wait_for_health(proxied.port, health_pb2.HealthCheckResponse.NOT_SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxied.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.IngestRealtime(
                    ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]),
                    metadata=auth(make_token(tenant)),
                    timeout=30,
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert rich_status(refused.value)[0] == "storage_unavailable"

            await proxy.restore()
            await wait_for_health(proxied.port, health_pb2.HealthCheckResponse.SERVING)
            response = await stub.IngestRealtime(
                ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]),
                metadata=auth(make_token(tenant)),
            )
            assert response.accepted_count == 1


async def test_redis_outage_never_fails_an_ingest(
    gateway_config: GatewayConfig,
    database_url: str,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]  # nothing listens here once the socket closes
    no_redis = Gateway(gateway_config, database_url, f"redis://127.0.0.1:{dead_port}/0")
    await no_redis.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{no_redis.port}") as channel:
            response = await ingest_pb2_grpc.IngestServiceStub(channel).IngestRealtime(
                ingest_pb2.IngestRealtimeRequest(data_points=[point(0), point(1)]),
                metadata=auth(make_token(tenant)),
            )
        assert response.accepted_count == 2
        assert no_redis.cache_failures == 1
    finally:
        await no_redis.stop(grace=1)


async def test_a_hung_database_is_noticed_and_calls_end_in_time(
    gateway_config: GatewayConfig,
    database_url: str,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    async with behind_proxy(
        gateway_config,
        database_url,
        batch_timeout=timedelta(seconds=3),
        connect_timeout=timedelta(seconds=2),
    ) as (hung, proxy):
        proxy.freeze()
        await wait_for_health(hung.port, health_pb2.HealthCheckResponse.NOT_SERVING, seconds=10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{hung.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                # The gateway's own bound (3 s) answers long before the client's deadline.
                await stub.IngestRealtime(
                    ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]),
                    metadata=auth(make_token(tenant)),
                    timeout=20,
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await proxy.restore()
            await wait_for_health(hung.port, health_pb2.HealthCheckResponse.SERVING)


async def test_rest_client_sees_503_with_retry_after_while_storage_hangs(
    tmp_path: Path,
    gateway_config: GatewayConfig,
    database_url: str,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    async with behind_proxy(gateway_config, database_url, batch_timeout=timedelta(seconds=2)) as (
        hung,
        proxy,
    ):
        front = EnvoyFront(tmp_path, "127.0.0.1:0", upstream_port=hung.port)
        await asyncio.to_thread(front.start)
        try:
            refused = await _post_while_frozen(front, proxy, tenant, make_token)
        finally:
            await asyncio.to_thread(front.stop)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "storage_unavailable"
    assert refused.json()["retry_after_seconds"] == 5
    assert refused.headers["retry-after"] == "5"


async def _post_while_frozen(
    front: EnvoyFront, proxy: CuttableProxy, tenant: str, make_token: TokenFactory
) -> httpx.Response:
    """One REST call once the front routes (200), then one with Postgres frozen."""
    context = ssl.create_default_context(cafile=str(front.certificate))
    async with httpx.AsyncClient(
        base_url=f"https://localhost:{front.port}", verify=context, timeout=30
    ) as client:
        payload = {"data_points": [json.loads(MessageToJson(point(0)))]}
        headers = {"authorization": f"Bearer {make_token(tenant)}"}
        for _ in range(50):  # Envoy sends traffic once its first health check passed
            ok = await client.post("/v1/ingest/realtime", json=payload, headers=headers)
            if ok.status_code == 200:
                break
            await asyncio.sleep(0.2)
        assert ok.status_code == 200, ok.text
        proxy.freeze()
        return await client.post("/v1/ingest/realtime", json=payload, headers=headers)
