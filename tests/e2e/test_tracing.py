"""Traces end to end: ``welltegra-agent run`` → Envoy (TLS 1.3, the production configuration) →
``welltegra-ingest serve`` → PostgreSQL, both processes exporting over OTLP/gRPC to a collector
(see ``otlp``). One batch must be one connected trace: the agent's ``upload batch`` span and the
gateway's spans of the same batch, down to its SQL statements, under the agent's call span, with
nothing in any attribute that is a point's value or a token. Without an OTLP endpoint, nothing
is traced and no exporter exists."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from edge.agent import Agent
from edge.collectors.simulator import Simulator
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials
from ingest_service.envoy_front import EnvoyFront
from ingest_service.tracing import AGENT_ID, BATCH_POINTS, BATCH_SEQUENCE, LANE

from .otlp import ExportedSpan, TraceCollector
from .stack import (
    GatewayServer,
    Identity,
    agent_config,
    run_agent,
    stop_agent,
    stored_points,
    wait_for,
)

pytestmark = pytest.mark.slow

CALL = "welltegra.ingest.v1.IngestService/Ingest"
# What the gateway does with one batch, each span under the one named beside it.
BATCH_TREE = {
    "limits": "ingest batch",
    "validate": "ingest batch",
    "store": "ingest batch",
    "cache": "ingest batch",
    "seal": "store",
    "transaction": "store",
    "tenant_fence": "transaction",
    "ledger_claim": "transaction",
    "copy_staging": "transaction",
    "insert_points": "transaction",
    "ledger_update": "transaction",
}
STATEMENTS = {"tenant_fence", "ledger_claim", "copy_staging", "insert_points", "ledger_update"}
# Attribute keys that would carry SQL text, parameters or credentials.
FORBIDDEN_KEYS = {"db.statement", "db.query.text", "db.query.parameter", "authorization"}


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[TraceCollector]:
    async with TraceCollector.running(tmp_path / "collector") as running:
        print(f"collector: {running.kind}")
        yield running


async def ledgered(database_url: str, tenant: str) -> list[int]:
    """The batch sequences the gateway has committed for ``tenant``."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f'SELECT batch_sequence FROM "{tenant}_streams".batch_ledger ORDER BY 1'
        )
    finally:
        await conn.close()
    return [row["batch_sequence"] for row in rows]


def simulated_values(config: Path, points: list[Identity]) -> set[float]:
    """The values of the stored points, recomputed from the deterministic simulator."""
    simulator = load_agent_config(config).data_sources[0]
    source = Simulator(simulator)  # type: ignore[arg-type]
    ticks = [source.tick_of(ts) for _, _, ts in points]
    return {r.value for r in source.readings_between(min(ticks), max(ticks))}


def assert_nothing_secret(spans: list[ExportedSpan], values: set[float], secret: str) -> None:
    """No attribute is a point's value, SQL text, a token or the client's secret."""
    fractional = {v for v in values if v != int(v)}  # an integral value could equal a count
    texts = [repr(v) for v in fractional]
    for span in spans:
        assert not FORBIDDEN_KEYS & set(span.attributes), (span.name, span.attributes)
        for key, value in span.attributes.items():
            where = f"{span.service} {span.name} {key}={value!r}"
            if isinstance(value, float):
                assert value not in fractional, f"a point's value in {where}"
            if isinstance(value, str):
                assert secret not in value and "eyJ" not in value, f"a credential in {where}"
                assert not any(text in value for text in texts), f"a point's value in {where}"


async def test_one_batch_is_one_trace_from_the_agent_through_envoy_to_its_sql_statements(
    tmp_path: Path, collector: TraceCollector, database_url: str, redis_url: str,
    master_key: str, tenant: str, client: ClientCredentials,
) -> None:
    # A schedule delay far beyond the test: spans leave only when each process stops and
    # flushes, which is what is checked too.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    gateway = GatewayServer(tmp_path / "gateway", database_url, redis_url, master_key, env=env)
    await gateway.start()
    front = EnvoyFront(tmp_path / "envoy", "127.0.0.1:0", upstream_port=gateway.port)
    try:
        await asyncio.to_thread(front.start)
        (tmp_path / "agent").mkdir()
        config = agent_config(
            tmp_path / "agent" / "agent.yaml", gateway, tenant, client.client_id,
            client.client_secret, wells=1, rate=2,
            api={
                "grpc_target": f"localhost:{front.port}",
                "tls": {"enabled": True, "ca_file": str(front.certificate)},
                "live_call_duration": "300ms",  # many short calls: most batches acknowledged
            },
        )
        agent = await run_agent(config, env=env)
        try:
            await wait_for(lambda: _at_least(database_url, tenant, 3), timeout=90)
            await asyncio.sleep(1)  # the calls that carried them end and are acknowledged
            assert collector.spans() == [], "spans were exported before the flush at stop"
        finally:
            await stop_agent(agent)
    finally:
        await asyncio.to_thread(front.stop)
        await gateway.stop()

    spans = collector.spans()
    by_id = {span.span_id: span for span in spans}
    assert "tracing on" in (config.parent / "agent.log").read_text()
    assert "tracing on" in (gateway.data_dir / "gateway.log").read_text()

    uploads = [
        s for s in spans
        if s.service == "welltegra-agent" and s.name == "upload batch" and s.status != "ERROR"
    ]
    assert uploads, f"no acknowledged upload batch span among {len(spans)} spans"
    committed = set(await ledgered(database_url, tenant))
    for upload in uploads:
        sequence = upload.attributes[BATCH_SEQUENCE]
        assert sequence in committed
        assert upload.attributes[LANE] == "live"
        assert upload.attributes[BATCH_POINTS] > 0
        assert "welltegra.batch.sealed_at" in upload.attributes
        assert upload.attributes["welltegra.batch.waited_seconds"] >= 0
        assert upload.attributes["welltegra.batch.accepted"] == upload.attributes[BATCH_POINTS]

        # The agent's call span is the batch span's parent, and the gateway's call its child.
        call = by_id[upload.parent_span_id]
        assert (call.service, call.name, call.kind) == ("welltegra-agent", CALL, "CLIENT")
        assert call.parent_span_id == ""  # the trace starts at the agent
        servers = [
            s for s in spans if s.parent_span_id == call.span_id and s.kind == "SERVER"
        ]
        assert len(servers) == 1, f"the gateway's call span of call {call.span_id}"
        server = servers[0]
        assert (server.service, server.name) == ("welltegra-gateway", CALL)
        assert server.attributes["rpc.grpc.status_code"] == 0
        assert [s.name for s in _children(spans, server) if s.name == "auth"] == ["auth"]

        # The gateway's span of the same batch, and under it every stage down to the SQL.
        batches = [
            s for s in _children(spans, server)
            if s.name == "ingest batch" and s.attributes.get(BATCH_SEQUENCE) == sequence
        ]
        assert len(batches) == 1, f"the gateway's span of batch {sequence}"
        batch = batches[0]
        assert batch.attributes[AGENT_ID] == upload.attributes[AGENT_ID]
        assert batch.attributes[BATCH_POINTS] == upload.attributes[BATCH_POINTS]
        below = _descendants(spans, batch)
        names = {s.name: s for s in below}
        assert set(BATCH_TREE) <= set(names), sorted(names)
        for name, parent in BATCH_TREE.items():
            assert by_id[names[name].parent_span_id].name == parent, name
        for name in STATEMENTS:
            statement = names[name]
            assert statement.kind == "CLIENT"
            assert statement.attributes["db.system"] == "postgresql"
            assert statement.attributes["welltegra.db.statement"] == name
        assert names["insert_points"].attributes["welltegra.db.rows"] == batch.attributes[
            BATCH_POINTS
        ]
        trace_ids = {s.trace_id for s in (upload, call, server, batch, *below)}
        assert trace_ids == {upload.trace_id}

    points = await stored_points(database_url, tenant)
    assert_nothing_secret(spans, simulated_values(config, points), client.client_secret)


async def test_without_an_endpoint_nothing_is_traced_and_no_exporter_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: TraceCollector,
    database_url: str, redis_url: str, master_key: str, tenant: str,
    client: ClientCredentials,
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    # Every other tracing variable set: none of them turns tracing on by itself.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "welltegra-untraced")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")

    def no_exporter(*args: object, **kwargs: object) -> None:
        raise AssertionError("an OTLP exporter was created although tracing is off")

    monkeypatch.setattr(trace_exporter.OTLPSpanExporter, "__init__", no_exporter)
    gateway = GatewayServer(tmp_path / "gateway", database_url, redis_url, master_key)
    await gateway.start()
    try:
        config = agent_config(
            tmp_path / "agent.yaml", gateway, tenant, client.client_id, client.client_secret,
            wells=1, rate=2, api={"live_call_duration": "300ms"},
        )
        agent = Agent(load_agent_config(config), serve_endpoints=False)
        await agent.start()
        try:
            assert not agent.tracing.enabled
            await wait_for(lambda: _at_least(database_url, tenant, 3), timeout=90)
            exporting = [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]
            assert exporting == []
        finally:
            await agent.stop()
    finally:
        await gateway.stop()
    await asyncio.sleep(0.5)
    assert collector.spans() == []
    assert "tracing on" not in (gateway.data_dir / "gateway.log").read_text()


async def _at_least(database_url: str, tenant: str, count: int) -> bool:
    return len(await ledgered(database_url, tenant)) >= count


def _children(spans: list[ExportedSpan], parent: ExportedSpan) -> list[ExportedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def _descendants(spans: list[ExportedSpan], root: ExportedSpan) -> list[ExportedSpan]:
    found, frontier = [], [root]
    while frontier:
        children = [s for p in frontier for s in _children(spans, p)]
        found.extend(children)
        frontier = children
    return found
