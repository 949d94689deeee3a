"""The gateway's Prometheus metrics, in a registry of each gateway's own (two gateways in one
process, as in the tests, never share values). ``serve --metrics-listen`` serves them at
``GET /metrics`` in the text format.

Labels stay bounded: ``tenant`` is only ever an authenticated tenant id (it matched the tenant
pattern and came from a verified token), ``rpc`` is a method of the ingest service, ``outcome``
and ``reason`` come from fixed sets. Calls refused before authentication carry no tenant: they
are counted in ``refusals_total`` only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ingest_service.audit import AuditEvent
from ingest_service.validation import MAX_POINTS

__all__ = ["PREFIX", "GatewayMetrics"]

PREFIX = "welltegra_gateway_"

# A batch holds 1 to MAX_POINTS points (an Ingest batch of data gaps only, none).
_BATCH_POINT_BUCKETS = (1, 10, 50, 100, 250, 500, MAX_POINTS)


class GatewayMetrics:
    """One gateway's metrics and the registry that holds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "Ingest calls (IngestRealtime) and stream batches (Ingest) of authenticated tenants,"
            " by outcome: accepted, partial, duplicate or refused",
            ["tenant", "rpc", "outcome"],
            registry=self.registry,
        )
        self.points = Counter(
            PREFIX + "points",
            "Data points of stored batches, by outcome: accepted, rejected or duplicate",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.historical_batches = Counter(
            PREFIX + "historical_batches",
            "Ingest batches replayed from an agent's backlog (a subset of requests), by outcome",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.historical_points = Counter(
            PREFIX + "historical_points",
            "Data points of stored backlog batches (a subset of points), by outcome",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.data_gaps = Counter(
            PREFIX + "data_gaps",
            "Data gaps (records of points an agent lost) recorded, once per committed batch",
            ["tenant"],
            registry=self.registry,
        )
        self.refusals = Counter(
            PREFIX + "refusals",
            "Refused calls and batches, by ErrorInfo reason (including unauthenticated ones)",
            ["reason"],
            registry=self.registry,
        )
        self.storage_seconds = Histogram(
            PREFIX + "storage_seconds",
            "Time to store one batch in PostgreSQL",
            registry=self.registry,
        )
        self.batch_points = Histogram(
            PREFIX + "batch_points",
            "Data points per batch that reached storage",
            buckets=_BATCH_POINT_BUCKETS,
            registry=self.registry,
        )
        self.limits_fallback_active = Gauge(
            PREFIX + "limits_fallback_active",
            "1 while per-tenant limits are enforced in-process because Redis is unreachable or"
            " slow",
            registry=self.registry,
        )
        self.cache_failures = Counter(
            PREFIX + "cache_failures",
            "Batches whose latest values could not be written to the Redis cache",
            registry=self.registry,
        )

    def record(self, event: AuditEvent) -> None:
        """Count one audited call or batch: the same event the audit log receives."""
        if event.outcome == "refused":
            self.refusals.labels(reason=event.reason or "internal_error").inc()
        if event.tenant_id is None:
            return  # refused before authentication: no tenant to label it with
        self.requests.labels(tenant=event.tenant_id, rpc=event.action, outcome=event.outcome).inc()
        if event.historical:
            self.historical_batches.labels(tenant=event.tenant_id, outcome=event.outcome).inc()
        if event.outcome == "refused":
            return
        for outcome, count in (
            ("accepted", event.accepted_count),
            ("rejected", event.rejected_count),
            ("duplicate", event.duplicate_count),
        ):
            if count:
                self.points.labels(tenant=event.tenant_id, outcome=outcome).inc(count)
                if event.historical:
                    self.historical_points.labels(tenant=event.tenant_id, outcome=outcome).inc(
                        count
                    )
        if event.gap_count:
            self.data_gaps.labels(tenant=event.tenant_id).inc(event.gap_count)
