"""Both processes' ``/metrics`` scraped over HTTP while ``welltegra-agent run`` streams to
``welltegra-ingest serve``: every metric the agent and the gateway define is there, with values
that fit the traffic (counters above zero where points flowed, zero where nothing failed, gauges
in range, histograms with counts), and the two sides' counts agree."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edge.metrics import AgentMetrics
from edge.uploader import INGEST_METHOD
from ingest_service.dev_issuer import ClientCredentials
from ingest_service.metrics import GatewayMetrics

from .stack import GatewayServer, agent_config, free_port, run_agent, stop_agent, wait_for

pytestmark = pytest.mark.slow


class Scrape:
    """One scrape of a ``/metrics`` page: families by name, sums of samples by labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def samples(self, name: str, suffix: str = "", **labels: str) -> list[Sample]:
        family = self.families[name]
        return [
            s for s in family.samples
            if s.name == name + suffix and labels.items() <= s.labels.items()
        ]

    def value(self, name: str, suffix: str = "", **labels: str) -> float:
        """The sum of the matching samples (0 when the metric has none yet)."""
        return sum(s.value for s in self.samples(name, suffix, **labels))

    def total(self, name: str, **labels: str) -> float:
        return self.value(name, "_total", **labels)

    def histogram(self, name: str, **labels: str) -> tuple[float, float]:
        """(count, sum), after checking that the buckets add up to the count."""
        count = self.value(name, "_count", **labels)
        buckets = sorted(
            (float(s.labels["le"]), s.value) for s in self.samples(name, "_bucket", **labels)
        )
        assert buckets, f"{name} has no buckets"
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), f"{name} buckets"
        assert buckets[-1] == (float("inf"), count)
        return count, self.value(name, "_sum", **labels)


Check = Callable[[Scrape, "Traffic"], None]


class Traffic:
    """What the checks know of the run: its tenant and when it started."""

    def __init__(self, tenant: str, started: float) -> None:
        self.tenant = tenant
        self.started = started
        self.agent: Scrape | None = None  # the agent's scrape, taken before the gateway's


def positive(name: str, **labels: str) -> Check:
    def check(scrape: Scrape, traffic: Traffic) -> None:
        assert scrape.total(name, **labels) > 0, f"{name}{labels}"

    return check


def zero(name: str, suffix: str = "_total") -> Check:
    def check(scrape: Scrape, traffic: Traffic) -> None:
        assert scrape.value(name, suffix) == 0, f"{name} should be 0 in a clean run"

    return check


def within(name: str, low: float, high: float, **labels: str) -> Check:
    def check(scrape: Scrape, traffic: Traffic) -> None:
        samples = scrape.samples(name, **labels)
        assert samples, f"{name}{labels} has no sample"
        for sample in samples:
            assert low <= sample.value <= high, f"{name}{sample.labels} = {sample.value}"

    return check


def histogram(name: str, mean_low: float, mean_high: float, **labels: str) -> Check:
    def check(scrape: Scrape, traffic: Traffic) -> None:
        count, total = scrape.histogram(name, **labels)
        assert count > 0, f"{name}{labels} observed nothing"
        assert mean_low <= total / count <= mean_high, f"{name} mean {total / count}"

    return check


def agent_checks() -> dict[str, Check]:
    def sent(scrape: Scrape, traffic: Traffic) -> None:
        tenant = {"tenant_id": traffic.tenant}
        sent = scrape.total("ingestion_data_points_sent", **tenant)
        collected = scrape.total("ingestion_data_points_collected", **tenant)
        assert 0 < sent <= collected

    def collected(scrape: Scrape, traffic: Traffic) -> None:
        assert scrape.total(
            "ingestion_data_points_collected", source="sim", tenant_id=traffic.tenant
        ) > 0

    def last_success(scrape: Scrape, traffic: Traffic) -> None:
        name = "ingestion_last_upload_success_timestamp_seconds"
        assert traffic.started <= scrape.value(name) <= time.time()

    def tokens(scrape: Scrape, traffic: Traffic) -> None:
        assert 1 <= scrape.total("ingestion_token_refreshes") <= 3

    return {
        "ingestion_data_points_collected": collected,
        "ingestion_data_points_sent": sent,
        "ingestion_data_points_failed": zero("ingestion_data_points_failed"),
        "ingestion_buffer_size_bytes": within("ingestion_buffer_size_bytes", 0, 10 * 2**30),
        "ingestion_api_request_duration_seconds": histogram(
            "ingestion_api_request_duration_seconds", 0, 35, endpoint=INGEST_METHOD
        ),
        "ingestion_buffer_pending_batches": within("ingestion_buffer_pending_batches", 0, 1000),
        "ingestion_buffer_pending_points": within("ingestion_buffer_pending_points", 0, 10**6),
        "ingestion_buffer_oldest_age_seconds": within(
            "ingestion_buffer_oldest_age_seconds", 0, 120
        ),
        "ingestion_data_points_dropped": zero("ingestion_data_points_dropped"),
        "ingestion_data_points_dead_lettered": zero("ingestion_data_points_dead_lettered"),
        "ingestion_dead_letter_batches": within("ingestion_dead_letter_batches", 0, 0),
        "ingestion_readings_skipped": zero("ingestion_readings_skipped"),
        "ingestion_source_records_rejected": zero("ingestion_source_records_rejected"),
        "ingestion_data_points_out_of_range": zero("ingestion_data_points_out_of_range"),
        "ingestion_collector_up": within("ingestion_collector_up", 1, 1, source="sim"),
        "ingestion_collector_restarts": zero("ingestion_collector_restarts"),
        "ingestion_upload_errors": zero("ingestion_upload_errors"),
        "ingestion_last_upload_success_timestamp_seconds": last_success,
        "ingestion_end_to_end_latency_seconds": histogram(
            "ingestion_end_to_end_latency_seconds", 0, 60, lane="live"
        ),
        "ingestion_token_refreshes": tokens,
    }


def gateway_checks() -> dict[str, Check]:
    prefix = "welltegra_gateway_"

    def requests(scrape: Scrape, traffic: Traffic) -> None:
        name = prefix + "requests"
        assert scrape.total(name, tenant=traffic.tenant, rpc="Ingest", outcome="accepted") > 0
        assert scrape.total(name, outcome="refused") == 0

    def points(scrape: Scrape, traffic: Traffic) -> None:
        name = prefix + "points"
        stored = scrape.total(name, tenant=traffic.tenant, outcome="accepted") + scrape.total(
            name, tenant=traffic.tenant, outcome="duplicate"
        )
        assert scrape.total(name, outcome="rejected") == 0
        # The gateway counts a batch before the agent hears of it: scraped after the agent,
        # it has seen at least what the agent was told.
        assert traffic.agent is not None
        assert stored >= traffic.agent.total(
            "ingestion_data_points_sent", tenant_id=traffic.tenant
        ) > 0

    def historical(name: str, of: str) -> Check:
        def check(scrape: Scrape, traffic: Traffic) -> None:
            assert 0 <= scrape.total(prefix + name) <= scrape.total(prefix + of)

        return check

    def batch_points(scrape: Scrape, traffic: Traffic) -> None:
        count, total = scrape.histogram(prefix + "batch_points")
        assert count > 0 and 1 <= total / count <= 1000
        # Observed as a batch reaches storage, before its points are counted.
        assert total >= scrape.total(prefix + "points")

    def storage(scrape: Scrape, traffic: Traffic) -> None:
        count, total = scrape.histogram(prefix + "storage_seconds")
        assert count > 0 and 0 < total / count < 5
        assert count >= scrape.total(prefix + "requests", outcome="accepted")

    return {
        prefix + "requests": requests,
        prefix + "points": points,
        prefix + "historical_batches": historical("historical_batches", "requests"),
        prefix + "historical_points": historical("historical_points", "points"),
        prefix + "data_gaps": zero(prefix + "data_gaps"),
        prefix + "refusals": zero(prefix + "refusals"),
        prefix + "storage_seconds": storage,
        prefix + "batch_points": batch_points,
        prefix + "limits_fallback_active": within(prefix + "limits_fallback_active", 0, 0),
        prefix + "cache_failures": zero(prefix + "cache_failures"),
    }


def defined(registry_owner: AgentMetrics | GatewayMetrics) -> set[str]:
    return {family.name for family in registry_owner.registry.collect()}


def test_every_defined_metric_has_a_check() -> None:
    assert set(agent_checks()) == defined(AgentMetrics("t"))
    assert set(gateway_checks()) == defined(GatewayMetrics())


async def test_both_processes_serve_every_metric_with_plausible_values_during_an_ingest(
    tmp_path: Path, database_url: str, redis_url: str, master_key: str, tenant: str,
    client: ClientCredentials,
) -> None:
    started = time.time()
    gateway = GatewayServer(
        tmp_path / "gateway", database_url, redis_url, master_key, metrics_port=free_port()
    )
    await gateway.start()
    agent_port = free_port()
    try:
        config = agent_config(
            tmp_path / "agent.yaml", gateway, tenant, client.client_id, client.client_secret,
            rate=20, api={"live_call_duration": "1s"},
        )
        data = yaml.safe_load(config.read_text())
        data["monitoring"] = {"health_check_port": free_port(),
                              "prometheus_metrics_port": agent_port}
        config.write_text(yaml.safe_dump(data))
        process = await run_agent(config)
        traffic = Traffic(tenant, started)
        try:
            async with httpx.AsyncClient(timeout=5) as http:

                async def scrape(port: int) -> Scrape:
                    response = await http.get(f"http://127.0.0.1:{port}/metrics")
                    response.raise_for_status()
                    return Scrape(response.text)

                async def flowing() -> bool:
                    try:
                        agent = await scrape(agent_port)
                    except httpx.TransportError:
                        return False
                    return (
                        agent.total("ingestion_data_points_sent", tenant_id=tenant) > 0
                        and agent.value("ingestion_end_to_end_latency_seconds", "_count") > 0
                    )

                await wait_for(flowing, timeout=90)
                # While points still flow: the agent first, then the gateway.
                traffic.agent = await scrape(agent_port)
                gateway_scrape = await scrape(gateway.metrics_port)  # type: ignore[arg-type]
        finally:
            await stop_agent(process)
    finally:
        await gateway.stop()

    for scraped, checks in ((traffic.agent, agent_checks()), (gateway_scrape, gateway_checks())):
        assert scraped is not None
        missing = set(checks) - set(scraped.families)
        assert not missing, f"not served: {sorted(missing)}"
        for check in checks.values():
            check(scraped, traffic)
