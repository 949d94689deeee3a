"""The agent's Prometheus metrics, scraped over real HTTP: every name the dashboards and alerts
use, with its type and labels, the buckets, and one registry per agent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.metrics import API_DURATION_BUCKETS, END_TO_END_BUCKETS, AgentMetrics, MetricsServerError

TENANT = "t_metrics"

# Exposed name -> (type, label names), exactly as Prometheus sees them.
EXPECTED: dict[str, tuple[str, frozenset[str]]] = {
    "ingestion_data_points_collected_total": ("counter", frozenset({"source", "tenant_id"})),
    "ingestion_data_points_sent_total": ("counter", frozenset({"tenant_id"})),
    "ingestion_data_points_failed_total": ("counter", frozenset({"tenant_id"})),
    "ingestion_buffer_size_bytes": ("gauge", frozenset({"tenant_id"})),
    "ingestion_api_request_duration_seconds": ("histogram", frozenset({"endpoint"})),
    "ingestion_buffer_pending_batches": ("gauge", frozenset({"tenant_id"})),
    "ingestion_buffer_pending_points": ("gauge", frozenset({"tenant_id"})),
    "ingestion_buffer_oldest_age_seconds": ("gauge", frozenset({"tenant_id"})),
    "ingestion_data_points_dropped_total": ("counter", frozenset({"tenant_id", "reason"})),
    "ingestion_data_points_dead_lettered_total": ("counter", frozenset({"tenant_id"})),
    "ingestion_dead_letter_batches": ("gauge", frozenset({"tenant_id"})),
    "ingestion_readings_skipped_total": ("counter", frozenset({"source", "reason"})),
    "ingestion_source_records_rejected_total": ("counter", frozenset({"source", "reason"})),
    "ingestion_data_points_out_of_range_total": ("counter", frozenset({"source"})),
    "ingestion_upload_errors_total": ("counter", frozenset({"code"})),
    "ingestion_last_upload_success_timestamp_seconds": ("gauge", frozenset()),
    "ingestion_end_to_end_latency_seconds": ("histogram", frozenset({"lane"})),
    "ingestion_collector_up": ("gauge", frozenset({"source"})),
    "ingestion_collector_restarts_total": ("counter", frozenset({"source"})),
    "ingestion_token_refreshes_total": ("counter", frozenset()),
}


def touch_every_metric(metrics: AgentMetrics, amount: float = 1.0) -> None:
    """Set each metric once, as the agent does, so each has a sample to scrape."""
    tenant = metrics.tenant_id
    metrics.points_collected.labels(source="opc", tenant_id=tenant).inc(amount)
    metrics.points_sent.labels(tenant_id=tenant).inc(amount)
    metrics.points_failed.labels(tenant_id=tenant).inc(amount)
    metrics.buffer_size.labels(tenant_id=tenant).set(4096 * amount)
    metrics.api_request_duration.labels(
        endpoint="/welltegra.ingest.v1.IngestService/Ingest"
    ).observe(0.02)
    metrics.buffer_pending_batches.labels(tenant_id=tenant).set(amount)
    metrics.buffer_pending_points.labels(tenant_id=tenant).set(amount)
    metrics.buffer_oldest_age.labels(tenant_id=tenant).set(amount)
    metrics.points_dropped.labels(tenant_id=tenant, reason="size_cap").inc(amount)
    metrics.points_dead_lettered.labels(tenant_id=tenant).inc(amount)
    metrics.dead_letter_batches.labels(tenant_id=tenant).set(amount)
    metrics.readings_skipped.labels(source="opc", reason="not_finite").inc(amount)
    metrics.records_rejected.labels(source="csv", reason="not_numeric").inc(amount)
    metrics.points_out_of_range.labels(source="opc").inc(amount)
    metrics.upload_errors.labels(code="UNAVAILABLE").inc(amount)
    metrics.last_upload_success.set(1_700_000_000)
    metrics.end_to_end_latency.labels(lane="live").observe(1.5)
    metrics.collector_up.labels(source="opc").set(1)
    metrics.collector_restarts.labels(source="opc").inc(amount)
    metrics.token_refreshes.inc(amount)


@pytest.fixture
def metrics() -> Iterator[AgentMetrics]:
    agent_metrics = AgentMetrics(TENANT)
    yield agent_metrics
    agent_metrics.stop()


def scrape(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def declared_types(text: str) -> dict[str, str]:
    """``# TYPE`` lines of a scrape, without the ``_created`` gauges the client adds."""
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            if not name.endswith("_created"):
                types[name] = kind
    return types


def test_a_scrape_shows_exactly_the_listed_metrics(metrics: AgentMetrics) -> None:
    touch_every_metric(metrics)
    port = metrics.serve("127.0.0.1", 0)
    assert port > 0 and metrics.port == port
    text = scrape(port)

    assert declared_types(text) == {name: kind for name, (kind, _) in EXPECTED.items()}
    labels_seen: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            exposed = sample.name
            for suffix in ("_bucket", "_count", "_sum"):
                if family.type == "histogram" and exposed.endswith(suffix):
                    exposed = exposed.removesuffix(suffix)
            labels_seen.setdefault(exposed, set()).add(frozenset(sample.labels) - {"le"})
    for name, (_, labels) in EXPECTED.items():
        assert labels_seen.get(name) == {labels}, name
    assert f'ingestion_data_points_collected_total{{source="opc",tenant_id="{TENANT}"}} 1.0' in (
        text
    )
    assert "ingestion_token_refreshes_total 1.0" in text


def test_histogram_buckets_span_what_they_measure(metrics: AgentMetrics) -> None:
    assert (API_DURATION_BUCKETS[0], API_DURATION_BUCKETS[-1]) == (0.005, 30.0)
    assert (END_TO_END_BUCKETS[0], END_TO_END_BUCKETS[-1]) == (0.01, 3600.0)
    metrics.end_to_end_latency.labels(lane="backlog").observe(3000)
    metrics.api_request_duration.labels(endpoint="/e").observe(0.004)
    text = scrape(metrics.serve("127.0.0.1", 0))
    assert 'ingestion_end_to_end_latency_seconds_bucket{lane="backlog",le="1800.0"} 0.0' in text
    assert 'ingestion_end_to_end_latency_seconds_bucket{lane="backlog",le="3600.0"} 1.0' in text
    assert 'ingestion_api_request_duration_seconds_bucket{endpoint="/e",le="0.005"} 1.0' in text


def test_two_agents_never_share_values() -> None:
    first, second = AgentMetrics("t_first"), AgentMetrics("t_second")
    try:
        touch_every_metric(first, amount=3)
        touch_every_metric(second, amount=5)
        first.token_refreshes.inc()
        one, two = scrape(first.serve("127.0.0.1", 0)), scrape(second.serve("127.0.0.1", 0))
    finally:
        first.stop()
        second.stop()
    assert "ingestion_token_refreshes_total 4.0" in one
    assert "ingestion_token_refreshes_total 5.0" in two
    assert 'ingestion_data_points_sent_total{tenant_id="t_first"} 3.0' in one
    assert "t_second" not in one and "t_first" not in two
    value = first.registry.get_sample_value(
        "ingestion_data_points_sent_total", {"tenant_id": "t_first"}
    )
    assert value == 3


def test_serve_again_stop_and_a_port_in_use(metrics: AgentMetrics) -> None:
    port = metrics.serve("127.0.0.1", 0)
    assert metrics.serve("127.0.0.1", 0) == port  # serving already: the same port
    other = AgentMetrics(TENANT)
    with pytest.raises(MetricsServerError, match=f"127.0.0.1:{port}"):
        other.serve("127.0.0.1", port)
    other.stop()  # safe after a failed serve

    metrics.stop()
    assert metrics.port is None
    metrics.stop()  # safe twice
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    # The port is free again.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
