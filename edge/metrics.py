"""The agent's Prometheus metrics, in a registry of each agent's own (two agents in one process,
as in the tests, never share values), served at ``GET /metrics`` on
``monitoring.prometheus_metrics_port``.

The names are the spec's ``ingestion_*`` ones and more. Labels stay bounded: ``source`` is a
configured data source, ``tenant_id`` the agent's one tenant, ``endpoint`` a gRPC method path,
``code`` a gRPC status code name (or ``token``), ``lane`` live or backlog, ``reason`` one of a
fixed set.

Errors::

    MetricsServerError   the metrics endpoint cannot listen on its address (an OSError)
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "API_DURATION_BUCKETS",
    "END_TO_END_BUCKETS",
    "AgentMetrics",
    "MetricsServerError",
]

# One Ingest call: a few milliseconds on a LAN, up to the call's timeout over a poor link.
API_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From a point's timestamp to the gateway's acknowledgement: live points arrive within seconds,
# a backlog drained after an outage within hours.
END_TO_END_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
    3600.0,
)  # fmt: skip


class MetricsServerError(OSError):
    """The metrics endpoint cannot listen on its address."""


class AgentMetrics:
    """One agent's metrics and the registry that holds them."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.registry = CollectorRegistry()
        registry = self.registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

        # The spec's five.
        self.points_collected = Counter(
            "ingestion_data_points_collected_total",
            "Readings accepted into the buffer",
            ["source", "tenant_id"],
            registry=registry,
        )
        self.points_sent = Counter(
            "ingestion_data_points_sent_total",
            "Data points the gateway acknowledged as stored (accepted, or duplicates of points"
            " already stored)",
            ["tenant_id"],
            registry=registry,
        )
        self.points_failed = Counter(
            "ingestion_data_points_failed_total",
            "Data points the gateway refused one by one, plus the points of dead-lettered batches",
            ["tenant_id"],
            registry=registry,
        )
        self.buffer_size = Gauge(
            "ingestion_buffer_size_bytes",
            "Bytes the buffer database occupies",
            ["tenant_id"],
            registry=registry,
        )
        self.api_request_duration = Histogram(
            "ingestion_api_request_duration_seconds",
            "Duration of one Ingest call, by gRPC method path",
            ["endpoint"],
            buckets=API_DURATION_BUCKETS,
            registry=registry,
        )

        # The buffer.
        self.buffer_pending_batches = Gauge(
            "ingestion_buffer_pending_batches",
            "Sealed batches waiting for the gateway's acknowledgement",
            ["tenant_id"],
            registry=registry,
        )
        self.buffer_pending_points = Gauge(
            "ingestion_buffer_pending_points",
            "Data points waiting for the gateway's acknowledgement",
            ["tenant_id"],
            registry=registry,
        )
        self.buffer_oldest_age = Gauge(
            "ingestion_buffer_oldest_age_seconds",
            "Age of the oldest unacknowledged batch (0 when none waits)",
            ["tenant_id"],
            registry=registry,
        )
        self.points_dropped = Counter(
            "ingestion_data_points_dropped_total",
            "Data points dropped from the buffer unsent, by reason: size_cap or retention",
            ["tenant_id", "reason"],
            registry=registry,
        )
        self.points_dead_lettered = Counter(
            "ingestion_data_points_dead_lettered_total",
            "Data points of batches the gateway refused as invalid, moved to the dead letters",
            ["tenant_id"],
            registry=registry,
        )
        self.dead_letter_batches = Gauge(
            "ingestion_dead_letter_batches",
            "Batches in the dead-letter table",
            ["tenant_id"],
            registry=registry,
        )

        # Collection.
        self.readings_skipped = Counter(
            "ingestion_readings_skipped_total",
            "Readings that could not be sent, by reason: no_value, not_finite or too_long",
            ["source", "reason"],
            registry=registry,
        )
        self.records_rejected = Counter(
            "ingestion_source_records_rejected_total",
            "Records a data source gave that its collector could not read (CSV rows, MQTT "
            "payload problems), by reason",
            ["source", "reason"],
            registry=registry,
        )
        self.points_out_of_range = Counter(
            "ingestion_data_points_out_of_range_total",
            "Data points outside their parameter's expected range (sent, flagged)",
            ["source"],
            registry=registry,
        )
        self.collector_up = Gauge(
            "ingestion_collector_up",
            "1 while a data source's collector runs, 0 while it waits to be restarted",
            ["source"],
            registry=registry,
        )
        self.collector_restarts = Counter(
            "ingestion_collector_restarts_total",
            "Restarts of a data source's collector after it failed",
            ["source"],
            registry=registry,
        )

        # Uploads.
        self.upload_errors = Counter(
            "ingestion_upload_errors_total",
            "Failed Ingest calls, by gRPC status code name, or token when no access token could"
            " be had",
            ["code"],
            registry=registry,
        )
        self.last_upload_success = Gauge(
            "ingestion_last_upload_success_timestamp_seconds",
            "Unix time of the last Ingest call the gateway acknowledged",
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "ingestion_end_to_end_latency_seconds",
            "Time from a batch's first point's timestamp to the gateway's acknowledgement, by"
            " lane: live or backlog",
            ["lane"],
            buckets=END_TO_END_BUCKETS,
            registry=registry,
        )
        self.token_refreshes = Counter(
            "ingestion_token_refreshes_total",
            "Access tokens fetched from the OAuth issuer",
            registry=registry,
        )

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when never set), as a scrape would show it: for the
        demo's live view and for tests."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else float(found)

    def serve(self, host: str, port: int) -> int:
        """Serve ``GET /metrics`` on ``host:port`` (0: a free port) from a daemon thread;
        returns the port. Serving already, returns the port served."""
        if self._server is not None:
            return int(self._server.server_port)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsServerError(
                f"the metrics endpoint cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._server, self._thread = server, thread
        return int(server.server_port)

    @property
    def port(self) -> int | None:
        """The port served, or None when not serving."""
        return None if self._server is None else int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving and release the port. Safe to call at any time."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
