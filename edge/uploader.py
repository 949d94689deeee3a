"""The uploader: sealed batches from the buffer to the gateway, over one long-lived gRPC channel.

Two lanes share the channel, each a loop of client-streaming ``Ingest`` calls:

* **live**: batches sealed within ``api.live_window``, sent as soon as they are sealed, so
  fresh points arrive within the latency target even while a backlog drains;
* **backlog**: older batches (what piled up during an outage), oldest first, up to
  ``api.max_batches_per_call`` per call, flagged ``historical`` so they never replace a
  fresher value in the gateway's latest-value cache. While live batches flow, the backlog
  takes at most ``api.backlog_share`` of the upload time.

A batch leaves the buffer only when the gateway's response lists it. What the gateway refuses as
invalid goes to the dead letters with the reason, and the queue moves on; everything else is
retried for ever with exponential backoff and jitter (``retry:``), the gateway's ``RetryInfo``
taking precedence. This module is the agent's one place for retries.

**Traces** (when the ``OTEL_*`` environment turns them on, see ``ingest_service.tracing``). W3C
trace context travels in gRPC metadata, which a call sends once, when it opens; a live call then
carries every batch sealed in its window, and a batch's bytes are the ones stored at seal time
(a resend is byte-identical), so a context per batch would need a field in the contract. Hence:

* each ``Ingest`` call is a client span, ``welltegra.ingest.v1.IngestService/Ingest`` (lane,
  agent id, batch and point counts, gRPC status), and its context is the ``traceparent`` the
  call sends: the gateway's spans of the call (its server span, then one ``ingest batch`` span
  per batch, down to the SQL statements) are its children, in the same trace;
* each batch the call carries is an ``upload batch`` child span, from the moment it is handed to
  the stream to the call's response (its acknowledgement, or the failure), with its sequence,
  point count, lane, agent id and the counts the gateway returned. ``welltegra.batch.sequence``
  is the key under which the gateway's ``ingest batch`` span of the same batch is found.

Collection and sealing happened earlier, in other tasks: no span pretends to cover them. The
batch span records when the batch was sealed (``welltegra.batch.sealed_at``), how long it then
waited in the buffer (``welltegra.batch.waited_seconds``) and the time range of its points
(``welltegra.batch.first_point_at``, ``...last_point_at``), as attributes. Never a value, never
the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from edge.buffer import Buffer, PendingBatch
from edge.metrics import AgentMetrics
from edge.oauth import TokenClient, TokenError
from ingest_service.tracing import (
    AGENT_ID,
    BATCH_POINTS,
    BATCH_SEQUENCE,
    LANE,
    failed,
    metadata_with_context,
)
from welltegra.ingest.v1 import ingest_pb2

__all__ = [
    "INGEST_METHOD",
    "Backoff",
    "CallTrace",
    "Lane",
    "RpcFailure",
    "Uploader",
    "UploaderSettings",
    "gateway_health",
]

log = logging.getLogger(__name__)

INGEST_METHOD = "/welltegra.ingest.v1.IngestService/Ingest"
SERVICE_NAME = "welltegra.ingest.v1.IngestService"
# Appended to a stored batch, this marks it historical: protobuf merges concatenated messages,
# so the stored bytes need not be decoded and re-encoded to send them on the backlog lane.
HISTORICAL_SUFFIX = ingest_pb2.IngestRequest(historical=True).SerializeToString()
# Reasons (ErrorInfo.reason) for which one batch, not the connection, is at fault: resending it
# can never succeed, so it goes to the dead letters.
BATCH_FAULTS = frozenset({"validation_error", "tenant_mismatch", "payload_too_large"})
IDLE_POLL = 1.0  # how often an idle backlog lane looks for batches that aged out of the live lane


class Lane(StrEnum):
    LIVE = "live"
    BACKLOG = "backlog"


@dataclass(frozen=True, slots=True)
class UploaderSettings:
    """The uploader's part of the configuration (``api:`` and ``retry:``), in plain units."""

    target: str
    tls: bool = True
    ca_file: str | None = None
    server_name: str | None = None
    timeout: float = 30.0
    keepalive_time: float = 30.0
    gzip: bool = True
    max_batches_per_call: int = 64
    backlog_share: float = 0.5
    live_window: float = 10.0
    live_call_duration: float = 5.0
    initial_delay: float = 2.0
    max_delay: float = 300.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.2


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter; the server's ``RetryInfo`` delay wins when given."""

    initial: float
    maximum: float
    multiplier: float
    jitter: float
    attempt: int = 0

    def next(self, server_delay: float | None = None) -> float:
        if server_delay is not None:
            delay = min(server_delay, self.maximum)
        else:
            delay = min(self.initial * self.multiplier**self.attempt, self.maximum)
            delay *= 1 + self.jitter * (2 * random.random() - 1)
        self.attempt += 1
        return max(delay, 0.0)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(slots=True)
class RpcFailure:
    """A failed call, read from its status: code, ErrorInfo, RetryInfo, BadRequest."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    violations: list[str] = field(default_factory=list)

    @classmethod
    def from_error(cls, error: grpc.aio.AioRpcError) -> RpcFailure:
        failure = cls(error.code(), error.details() or "")
        raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
        if not isinstance(raw, bytes):
            return failure
        status = status_pb2.Status()
        with contextlib.suppress(Exception):
            status.ParseFromString(raw)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                failure.reason = info.reason
                failure.metadata = dict(info.metadata)
            elif detail.Unpack(retry):
                failure.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
            elif detail.Unpack(bad):
                failure.violations = [f"{v.field}: {v.description}" for v in bad.field_violations]
        return failure

    def describe(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.violations:
            text += " (" + "; ".join(self.violations[:10]) + ")"
        return text


class CallTrace:
    """The spans of one ``Ingest`` call: the call's own, whose context the call's metadata
    carries, and one per batch sent, ended by the call's response (see the module docstring).
    With a no-op tracer every span is a no-op."""

    def __init__(self, tracer: Tracer, lane: Lane, agent_id: str, target: str) -> None:
        self._tracer = tracer
        self._common: dict[str, str] = {LANE: lane.value, AGENT_ID: agent_id}
        self._span = tracer.start_span(
            INGEST_METHOD.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE_NAME,
                "rpc.method": "Ingest",
                "server.address": target,
                **self._common,
            },
        )
        self._context = trace.set_span_in_context(self._span)
        self._open: dict[int, Span] = {}
        self._batches = self._points = 0
        self._ended = False

    def metadata(self, metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """``metadata`` plus the call span's ``traceparent`` (and ``tracestate``)."""
        return metadata_with_context(metadata, self._context)

    def sent(self, batch: PendingBatch) -> None:
        """``batch`` is handed to the call's stream now."""
        self._batches += 1
        self._points += batch.point_count
        if not self._span.is_recording():
            return  # tracing off (or this call not sampled): nothing to describe
        now = time.time()
        attributes: dict[str, str | int | float] = {
            BATCH_SEQUENCE: batch.sequence,
            BATCH_POINTS: batch.point_count,
            "welltegra.batch.gap_records": batch.gap_count,
            "welltegra.batch.sealed_at": _instant(batch.sealed_at),
            "welltegra.batch.waited_seconds": round(max(now - batch.sealed_at, 0.0), 6),
            **self._common,
        }
        if batch.first_ts is not None and batch.last_ts is not None:
            attributes["welltegra.batch.first_point_at"] = _instant(batch.first_ts)
            attributes["welltegra.batch.last_point_at"] = _instant(batch.last_ts)
        self._open[batch.sequence] = self._tracer.start_span(
            "upload batch", context=self._context, attributes=attributes
        )

    def acknowledged(self, results: Sequence[ingest_pb2.BatchResult]) -> None:
        """The call's response: each batch it lists ends with the gateway's counts."""
        for result in results:
            span = self._open.pop(result.batch_sequence, None)
            if span is not None:
                span.set_attributes(
                    {
                        "welltegra.batch.accepted": result.accepted_count,
                        "welltegra.batch.rejected": result.rejected_count,
                        "welltegra.batch.duplicate": result.duplicate_count,
                        "welltegra.batch.duplicate_batch": result.duplicate_batch,
                    }
                )
                span.end()
        self.end(grpc.StatusCode.OK)

    def end(self, code: grpc.StatusCode | None, reason: str = "") -> None:
        """End the call span (and the spans of batches no response acknowledged) with the
        call's status: ``code`` None when no call was made (no token). Only the first end
        counts."""
        if self._ended:
            return
        self._ended = True
        for span in self._open.values():
            failed(span, reason or "not acknowledged")
            span.end()
        self._open.clear()
        self._span.set_attributes(
            {"welltegra.call.batches": self._batches, "welltegra.call.points": self._points}
        )
        if code is not None:
            self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            failed(self._span, reason or (code.name if code is not None else "failed"))
        self._span.end()


class Uploader:
    """Sends the buffer's sealed batches until cancelled; see the module docstring."""

    def __init__(
        self,
        buffer: Buffer,
        tokens: TokenClient,
        settings: UploaderSettings,
        metrics: AgentMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._buffer = buffer
        self._tokens = tokens
        self._settings = settings
        self._metrics = metrics
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._channel = _channel(settings)
        self._ingest = self._channel.stream_unary(
            INGEST_METHOD,
            request_serializer=None,  # the buffer holds serialized requests already
            response_deserializer=ingest_pb2.IngestResponse.FromString,
        )
        self.last_success: float | None = None  # time.time() of the last acknowledged call
        self._live_sent_at = 0.0
        self._failing: dict[Lane, str | None] = {Lane.LIVE: None, Lane.BACKLOG: None}

    async def run(self) -> None:
        """Both lanes, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._lane(Lane.LIVE), name="upload-live")
            group.create_task(self._lane(Lane.BACKLOG), name="upload-backlog")

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _lane(self, lane: Lane) -> None:
        s = self._settings
        backoff = Backoff(s.initial_delay, s.max_delay, s.backoff_multiplier, s.jitter)
        while True:
            if lane is Lane.LIVE:
                self._buffer.sealed.clear()
            batches = await self._next(lane, s.max_batches_per_call)
            if not batches:
                await self._idle(lane)
                continue
            started = time.monotonic()
            try:
                delay = await self._send(lane, batches)
            finally:
                self._buffer.in_flight.difference_update(b.sequence for b in batches)
            if delay is None:
                backoff.reset()
                if lane is Lane.BACKLOG:
                    await self._pace(time.monotonic() - started)
            else:
                await asyncio.sleep(backoff.next(delay if delay > 0 else None))

    async def _next(self, lane: Lane, limit: int) -> list[PendingBatch]:
        """The lane's next batches, marked in flight (the caller unmarks them)."""
        horizon = time.time() - self._settings.live_window
        if lane is Lane.LIVE:
            batches = await self._buffer.pending(limit=limit, sealed_after=horizon)
        else:
            batches = await self._buffer.pending(limit=limit, sealed_before=horizon)
        self._buffer.in_flight.update(b.sequence for b in batches)
        return batches

    async def _idle(self, lane: Lane) -> None:
        if lane is Lane.LIVE:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._buffer.sealed.wait(), timeout=IDLE_POLL)
        else:
            await asyncio.sleep(IDLE_POLL)

    async def _pace(self, took: float) -> None:
        """Keep the backlog within its share of the upload time while live data flows."""
        share = self._settings.backlog_share
        if share < 1 and time.monotonic() - self._live_sent_at < 2 * IDLE_POLL:
            await asyncio.sleep(took * (1 - share) / share)

    async def _requests(
        self, lane: Lane, batches: list[PendingBatch], spans: CallTrace
    ) -> AsyncIterator[bytes]:
        """The stream of one call. The backlog sends what it was given. The live lane keeps
        its call open for ``live_call_duration``, sending each batch as soon as it is sealed:
        the gateway commits every batch as it arrives, so points are stored within a linger
        of being read, while the call (and its acknowledgement) is made once per window."""
        suffix = HISTORICAL_SUFFIX if lane is Lane.BACKLOG else b""
        closes = time.monotonic() + self._settings.live_call_duration
        queue = list(batches)
        while queue:
            for batch in queue:
                spans.sent(batch)
                yield batch.payload + suffix
                if lane is Lane.LIVE:
                    self._live_sent_at = time.monotonic()
            queue = []
            room = self._settings.max_batches_per_call - len(batches)
            while lane is Lane.LIVE and room > 0 and not queue:
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    return
                self._buffer.sealed.clear()
                queue = await self._next(lane, room)
                if not queue:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._buffer.sealed.wait(), timeout=remaining)
            batches.extend(queue)

    async def _send(self, lane: Lane, batches: list[PendingBatch]) -> float | None:
        """One Ingest call. None when it succeeded (or the queue may move on at once); else
        the delay before the next attempt: 0 for the backoff's own, >0 the server's.
        ``batches`` grows with what a live call sends after it opened."""
        spans = CallTrace(self._tracer, lane, self._buffer.agent_id, self._settings.target)
        try:
            return await self._call(lane, batches, spans)
        finally:
            spans.end(grpc.StatusCode.CANCELLED, "cancelled")  # unless it ended already

    async def _call(
        self, lane: Lane, batches: list[PendingBatch], spans: CallTrace
    ) -> float | None:
        try:
            token = await self._tokens.token()
        except TokenError as exc:
            spans.end(None, "token")
            self._count_error("token")
            self._report_failure(
                lane, f"cannot get an access token: {exc}", permanent=not exc.retryable
            )
            return exc.retry_after or 0
        started = time.perf_counter()
        try:
            response: ingest_pb2.IngestResponse = await self._ingest(
                self._requests(lane, batches, spans),
                metadata=spans.metadata((("authorization", f"Bearer {token}"),)),
                timeout=self._settings.timeout + self._settings.live_call_duration,
            )
        except grpc.aio.AioRpcError as error:
            self._observe_duration(started)
            failure = RpcFailure.from_error(error)
            spans.end(failure.code, failure.reason or failure.code.name)
            return await self._handle_failure(lane, batches, failure)
        self._observe_duration(started)
        spans.acknowledged(response.batches)
        await self._acknowledge(lane, batches, response.batches)
        self._recovered(lane)
        return None

    async def _acknowledge(
        self,
        lane: Lane,
        batches: Sequence[PendingBatch],
        results: Sequence[ingest_pb2.BatchResult],
    ) -> None:
        by_sequence = {b.sequence: b for b in batches}
        acknowledged = [r.batch_sequence for r in results if r.batch_sequence in by_sequence]
        await self._buffer.acknowledge(acknowledged)
        now = time.time()
        self.last_success = now
        metrics = self._metrics
        if metrics is None:
            return
        metrics.last_upload_success.set(now)
        for result in results:
            metrics.points_sent.labels(tenant_id=metrics.tenant_id).inc(
                result.accepted_count + result.duplicate_count
            )
            if result.rejected_count:
                metrics.points_failed.labels(tenant_id=metrics.tenant_id).inc(
                    result.rejected_count
                )
            batch = by_sequence.get(result.batch_sequence)
            if batch is not None and batch.first_ts is not None:
                metrics.end_to_end_latency.labels(lane=lane.value).observe(now - batch.first_ts)

    async def _handle_failure(
        self, lane: Lane, batches: Sequence[PendingBatch], failure: RpcFailure
    ) -> float | None:
        self._count_error(failure.code.name)
        if failure.code is grpc.StatusCode.UNAUTHENTICATED:
            # The token may have been revoked or have expired early: fetch a new one next time.
            self._tokens.invalidate()
            self._report_failure(lane, f"the gateway refused the token: {failure.describe()}")
            return failure.retry_after or 0
        faulty = _faulty_batch(batches, failure)
        if faulty is not None:
            # The batches before it in this call were committed; acknowledging them here
            # would need their counts, so they are simply resent and answered as duplicates.
            points = await self._buffer.dead_letter(
                faulty.sequence, f"{failure.reason or failure.code.name}: {failure.describe()}"
            )
            if self._metrics is not None:
                tenant = self._metrics.tenant_id
                self._metrics.points_dead_lettered.labels(tenant_id=tenant).inc(points)
                self._metrics.points_failed.labels(tenant_id=tenant).inc(points)
            return None
        self._report_failure(lane, failure.describe())
        return failure.retry_after or 0

    def _report_failure(self, lane: Lane, text: str, permanent: bool = False) -> None:
        """One log line when a lane starts failing (or the reason changes), not per retry."""
        if self._failing[lane] != text:
            level = logging.ERROR if permanent else logging.WARNING
            log.log(level, "%s upload failing, data stays buffered: %s", lane.value, text)
            self._failing[lane] = text

    def _recovered(self, lane: Lane) -> None:
        if self._failing[lane] is not None:
            log.info("%s upload recovered", lane.value)
            self._failing[lane] = None

    def _count_error(self, code: str) -> None:
        if self._metrics is not None:
            self._metrics.upload_errors.labels(code=code).inc()

    def _observe_duration(self, started: float) -> None:
        if self._metrics is not None:
            self._metrics.api_request_duration.labels(endpoint=INGEST_METHOD).observe(
                time.perf_counter() - started
            )


async def gateway_health(settings: UploaderSettings, timeout: float = 5.0) -> str:
    """The gateway's gRPC health status for the ingest service (``test-connections``); it
    needs no token."""
    async with _channel(settings) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _instant(seconds: float) -> str:
    """A Unix time as RFC 3339 (UTC), as span attributes show times."""
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def _faulty_batch(batches: Sequence[PendingBatch], failure: RpcFailure) -> PendingBatch | None:
    """The batch the gateway refused as such, if the failure names one."""
    if failure.code is not grpc.StatusCode.INVALID_ARGUMENT and failure.reason not in BATCH_FAULTS:
        return None
    if failure.reason and failure.reason not in BATCH_FAULTS:
        return None
    sequence = failure.metadata.get("batch_sequence")
    index = failure.metadata.get("batch_index")
    for batch in batches:
        if sequence is not None and str(batch.sequence) == sequence:
            return batch
    if index is not None and index.isdigit() and 1 <= int(index) <= len(batches):
        return batches[int(index) - 1]
    return None


def _channel(settings: UploaderSettings) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Pings only while a call is open: servers refuse idle pings more often than 5 min.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 10_000),
    ]
    compression = grpc.Compression.Gzip if settings.gzip else grpc.Compression.NoCompression
    if not settings.tls:
        return grpc.aio.insecure_channel(settings.target, options, compression)
    root = None
    if settings.ca_file is not None:
        with open(settings.ca_file, "rb") as handle:
            root = handle.read()
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.aio.secure_channel(settings.target, credentials, options, compression)
