"""The metrics endpoint (``metrics_listen``): what one gateway counts, scraped over HTTP."""

from __future__ import annotations

import secrets

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest_service.config import GatewayConfig
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import auth, point
from .test_refusals import rich_status


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_endpoint_counts_outcomes_refusals_and_storage_time(
    gateway_config: GatewayConfig,
    database_url: str,
    redis_url: str,
    make_token: TokenFactory,
) -> None:
    config = gateway_config.model_copy(update={"metrics_listen": "127.0.0.1:0"})
    gateway = Gateway(config, database_url, redis_url)
    await gateway.start()
    tenant = f"t_{secrets.token_hex(5)}"
    try:
        assert gateway.metrics_port > 0
        await gateway.storage.create_tenant(tenant)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            response = await stub.IngestRealtime(
                ingest_pb2.IngestRealtimeRequest(
                    data_points=[point(0), point(1), point(2, value=-5.0)]
                ),
                metadata=auth(make_token(tenant)),
            )
            assert (response.accepted_count, response.rejected_count) == (2, 1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.IngestRealtime(
                    ingest_pb2.IngestRealtimeRequest(data_points=[point(3)])
                )  # no token
            assert rich_status(refused.value)[0] == "invalid_token"

        async with httpx.AsyncClient(timeout=10) as client:
            scrape = await client.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
        found = samples(scrape.text)

        def value(name: str, **labels: str) -> float | None:
            return found.get(("welltegra_gateway_" + name, frozenset(labels.items())))

        assert value("requests_total", tenant=tenant, rpc="IngestRealtime", outcome="partial") == 1
        # The unauthenticated refusal has no tenant: it is only a refusal, by reason.
        requests = [key for key in found if key[0] == "welltegra_gateway_requests_total"]
        assert len(requests) == 1
        assert value("points_total", tenant=tenant, outcome="accepted") == 2
        assert value("points_total", tenant=tenant, outcome="rejected") == 1
        assert value("points_total", tenant=tenant, outcome="duplicate") is None
        assert value("refusals_total", reason="invalid_token") == 1
        assert [key for key in found if key[0] == "welltegra_gateway_refusals_total"] == [
            ("welltegra_gateway_refusals_total", frozenset({("reason", "invalid_token")}))
        ]
        assert value("storage_seconds_count") == 1
        assert (value("storage_seconds_sum") or 0) > 0
        assert value("batch_points_count") == 1
        assert value("batch_points_sum") == 3
        assert value("limits_fallback_active") == 0
        assert value("cache_failures_total") == 0
    finally:
        await gateway.audit.flush()
        await gateway.storage.drop_tenant(tenant)
        await gateway.storage.pool.execute(
            "DELETE FROM system_monitoring.audit_log WHERE tenant_id = $1", tenant
        )
        port = gateway.metrics_port
        await gateway.stop(grace=1)
    # Stopped with the gateway: nothing listens there any more.
    async with httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/metrics")
