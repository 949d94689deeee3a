"""The agent process: collectors → transform → buffer → uploader, with health and metrics.

``Agent.start()`` opens the buffer first, so nothing is collected that could not be kept, then
starts the collectors (each supervised: one that fails is restarted with backoff and never stops
the others), the uploader, and the health and metrics endpoints. ``stop()`` stops collecting,
seals what is open and closes the buffer; unsent batches stay for the next start. Tracing (off
unless the ``OTEL_*`` environment asks for it, see ``ingest_service.tracing``) starts with the
uploader and is flushed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from edge.buffer import Buffer
from edge.collectors.base import Collector, SourceConfig
from edge.config import AgentConfig
from edge.health import HealthServer, Readiness
from edge.metrics import AgentMetrics
from edge.oauth import TokenClient
from edge.readings import Reading
from edge.transform import Transform
from edge.uploader import Backoff, Uploader, UploaderSettings
from ingest_service.tracing import AGENT_SERVICE, Tracing

__all__ = ["Agent", "SourceSink", "token_client", "uploader_settings"]

log = logging.getLogger(__name__)

STATS_INTERVAL = 5.0
# Not ready when data waits and nothing was acknowledged for this long.
UPLOAD_STALE_AFTER = 300.0


def freeze_long_lived() -> None:
    """Move what exists now out of the cyclic garbage collector's sight, for good.

    Called once the agent has started: the configuration, the parameter registry (pint's
    unit tables), the collectors and their protocol libraries live as long as the process.
    Left in the collector's oldest generation they are rescanned at every full pass, and a
    collector making millions of short-lived readings triggers many: a third of a 1 M-row
    CSV file's time (bench/csv_ingest.py). Garbage is collected first, so none is frozen."""
    gc.collect()
    gc.freeze()


class SourceSink:
    """The ``ReadingSink`` of one source: transform, count, buffer."""

    def __init__(
        self, source: str, transform: Transform, buffer: Buffer, metrics: AgentMetrics
    ) -> None:
        self._source = source
        self._transform = transform
        self._buffer = buffer
        self._metrics = metrics

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        result = self._transform.apply(readings)
        for reason, count in result.skipped.items():
            self._metrics.readings_skipped.labels(source=self._source, reason=reason).inc(count)
        if result.out_of_range:
            self._metrics.points_out_of_range.labels(source=self._source).inc(result.out_of_range)
        await self._buffer.append(self._source, result.points, watermarks)

    async def watermark(self, key: str) -> str | None:
        return await self._buffer.watermark(self._source, key)

    def reject(self, reason: str, count: int = 1) -> None:
        self._metrics.records_rejected.labels(source=self._source, reason=reason).inc(count)


def uploader_settings(config: AgentConfig) -> UploaderSettings:
    api, retry = config.api, config.retry
    return UploaderSettings(
        target=api.grpc_target,
        tls=api.tls.enabled,
        ca_file=str(api.tls.ca_file) if api.tls.ca_file else None,
        server_name=api.tls.server_name,
        timeout=api.timeout.total_seconds(),
        keepalive_time=api.keepalive_time.total_seconds(),
        gzip=api.compression == "gzip",
        max_batches_per_call=api.max_batches_per_call,
        backlog_share=api.backlog_share,
        live_window=api.live_window.total_seconds(),
        live_call_duration=api.live_call_duration.total_seconds(),
        initial_delay=retry.initial_delay.total_seconds(),
        max_delay=retry.max_delay.total_seconds(),
        backoff_multiplier=retry.backoff_multiplier,
        jitter=retry.jitter,
    )


def token_client(config: AgentConfig, metrics: AgentMetrics | None = None) -> TokenClient:
    oauth = config.oauth
    return TokenClient(
        token_url=oauth.token_url,
        client_id=oauth.client_id,
        client_secret=oauth.client_secret.get_secret_value(),
        audience=oauth.audience,
        scope=oauth.scope,
        refresh_margin=oauth.token_refresh_margin.total_seconds(),
        timeout=oauth.timeout.total_seconds(),
        ca_file=oauth.ca_file,
        on_refresh=metrics.token_refreshes.inc if metrics is not None else None,
    )


async def open_buffer(config: AgentConfig) -> Buffer:
    settings = config.buffer
    return await Buffer.open(
        settings.database_path,
        tenant_id=config.tenant.id,
        max_size_gb=settings.max_size_gb,
        retention_days=settings.retention_days,
        full_policy=settings.full_policy,
        batch_max_points=settings.batch_max_points,
        linger=settings.linger.total_seconds(),
    )


class Agent:
    """One running agent. ``start`` then ``stop``; ``stop`` is safe after a failed start."""

    def __init__(self, config: AgentConfig, *, serve_endpoints: bool = True) -> None:
        self.config = config
        self.metrics = AgentMetrics(config.tenant.id)
        # Loss counters exist at 0 from the start, so an alert sees their first increase.
        for reason in ("size_cap", "retention"):
            self.metrics.points_dropped.labels(tenant_id=config.tenant.id, reason=reason)
        self.metrics.points_dead_lettered.labels(tenant_id=config.tenant.id)
        self.buffer: Buffer | None = None
        self.uploader: Uploader | None = None
        self.health: HealthServer | None = None
        self.metrics_port: int | None = None
        self.tracing = Tracing.off()
        self._serve_endpoints = serve_endpoints
        self._tokens: TokenClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._collector_tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        config = self.config
        self.buffer = await open_buffer(config)
        self.buffer.on_sealed = self._count_collected
        log.info(
            "agent %s of tenant %s: buffer %s", self.buffer.agent_id, config.tenant.id,
            config.buffer.database_path,
        )
        self._tokens = token_client(config, self.metrics)
        if not self.tracing.enabled:  # a retried start keeps the tracing it has
            self.tracing = Tracing.from_environ(AGENT_SERVICE)
        self.uploader = Uploader(
            self.buffer, self._tokens, uploader_settings(config), self.metrics,
            tracer=self.tracing.tracer,
        )
        if self._serve_endpoints:
            monitoring = config.monitoring
            self.metrics_port = self.metrics.serve(
                monitoring.listen_address, monitoring.prometheus_metrics_port
            )
            self.health = HealthServer(
                monitoring.listen_address, monitoring.health_check_port, self.readiness
            )
            await self.health.start()
            log.info(
                "health on %s:%d, metrics on %s:%d",
                monitoring.listen_address, self.health.port,
                monitoring.listen_address, self.metrics_port,
            )
        registry = config.registry()
        for source in config.enabled_sources():
            sink = SourceSink(source.name, Transform(registry, source.name), self.buffer,
                              self.metrics)
            self._collector_tasks.append(
                asyncio.create_task(self._supervise(source, sink), name=f"collector-{source.name}")
            )
        self._tasks.append(asyncio.create_task(self.uploader.run(), name="uploader"))
        self._tasks.append(asyncio.create_task(self._report_buffer(), name="buffer-stats"))

    async def stop_collecting(self) -> None:
        """Stop the collectors and seal what they read; uploading goes on (a drain)."""
        await _cancel(self._collector_tasks)
        if self.buffer is not None:
            with contextlib.suppress(Exception):
                await self.buffer.flush()

    async def stop(self) -> None:
        """Stop collecting, seal what is open, stop uploading, close everything."""
        await self.stop_collecting()
        await _cancel(self._tasks)
        if self.uploader is not None:
            await self.uploader.close()
        if self._tokens is not None:
            await self._tokens.aclose()
        if self.health is not None:
            await self.health.stop()
        if self.metrics_port is not None:
            self.metrics.stop()
        if self.buffer is not None:
            await self.buffer.close()
        await asyncio.to_thread(self.tracing.shutdown)

    def _count_collected(self, by_source: Mapping[str, int]) -> None:
        """Points count as collected once they are sealed in the buffer."""
        for source, count in by_source.items():
            self.metrics.points_collected.labels(
                source=source, tenant_id=self.metrics.tenant_id
            ).inc(count)

    async def readiness(self) -> Readiness:
        """Ready when the buffer is writable and uploads are not stale while data waits."""
        checks: dict[str, Any] = {}
        buffer = self.buffer
        ready = buffer is not None and buffer.writable
        checks["buffer_writable"] = ready
        last = self.uploader.last_success if self.uploader else None
        checks["last_upload_success_age_seconds"] = None if last is None else time.time() - last
        if buffer is not None:
            stats = await buffer.stats()
            checks["pending_batches"] = stats.pending_batches
            stale = stats.oldest_sealed_at is not None and (
                time.time() - stats.oldest_sealed_at > UPLOAD_STALE_AFTER
            )
            checks["upload_stale"] = stale
            ready = ready and not stale
        return Readiness(ready=ready, checks=checks)

    async def _supervise(self, source: SourceConfig, sink: SourceSink) -> None:
        """Run one collector for ever: restart it with backoff when it fails."""
        retry = self.config.retry
        backoff = Backoff(
            retry.initial_delay.total_seconds(), retry.max_delay.total_seconds(),
            retry.backoff_multiplier, retry.jitter,
        )
        up = self.metrics.collector_up.labels(source=source.name)
        while True:
            collector: Collector = source.build()
            started = time.monotonic()
            up.set(1)
            try:
                await collector.run(sink)
                log.warning("collector %s stopped by itself; restarting it", source.name)
            except asyncio.CancelledError:
                up.set(0)
                raise
            except Exception as exc:
                log.error("collector %s failed: %s", source.name, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
            up.set(0)
            self.metrics.collector_restarts.labels(source=source.name).inc()
            if time.monotonic() - started > 60:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _report_buffer(self) -> None:
        """Buffer gauges and drop counters, refreshed every few seconds."""
        assert self.buffer is not None
        metrics, tenant = self.metrics, self.config.tenant.id
        reported = {"size_cap": 0, "retention": 0}
        while True:
            stats = await self.buffer.stats()
            metrics.buffer_size.labels(tenant_id=tenant).set(stats.used_bytes)
            metrics.buffer_pending_batches.labels(tenant_id=tenant).set(stats.pending_batches)
            metrics.buffer_pending_points.labels(tenant_id=tenant).set(stats.pending_points)
            metrics.dead_letter_batches.labels(tenant_id=tenant).set(stats.dead_letter_batches)
            age = 0.0 if stats.oldest_sealed_at is None else time.time() - stats.oldest_sealed_at
            metrics.buffer_oldest_age.labels(tenant_id=tenant).set(max(age, 0.0))
            for reason, total in self.buffer.dropped.items():
                new = total - reported.get(reason, 0)
                if new > 0:
                    metrics.points_dropped.labels(tenant_id=tenant, reason=reason).inc(new)
                    reported[reason] = total
            await asyncio.sleep(STATS_INTERVAL)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
