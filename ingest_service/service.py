"""The ingest service: both RPCs run the same pipeline, stage by stage, in the order of the
design (authenticate → tenant → limits → validate → store → cache).

Authentication has already happened in ``auth.AuthInterceptor`` when a handler here runs. The
handlers receive the request as raw bytes: the limits stage sees the message size before
anything is parsed, and a message that does not parse is a clear INVALID_ARGUMENT instead of
grpc's generic deserialisation error.

``Ingest`` commits each batch of the stream as it arrives, with the data gaps it carries (the
agent's records of points it lost). A batch marked ``historical`` (replayed from the agent's
backlog) is stored like any other but never touches the latest-value cache: its points are
older than what the agent sends live. When a batch is refused, the stream
ends with that batch's error (its ``batch_index`` in the stream and, once parsed, its
``batch_sequence`` in ``ErrorInfo.metadata``); the batches before
it stay committed, and a resend of them is answered as duplicates.

Traces: the call's span is opened by the auth interceptor; here each batch of a stream gets an
``ingest batch`` span under it (``IngestRealtime``, one batch, goes without), and under that the
stages: ``limits``, ``validate``, ``store`` (with one span per SQL statement, see
``storage``) and ``cache``. The batch span carries the batch's sequence, agent id and counts.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Span, Tracer

from ingest_service.audit import AuditEvent, AuditLog
from ingest_service.auth import Principal, current_principal
from ingest_service.cache import LatestValueCache
from ingest_service.errors import FieldViolation, GatewayError, InvalidRequest, abort
from ingest_service.limits import Limiter
from ingest_service.metrics import GatewayMetrics
from ingest_service.storage import BatchOutcome, Storage
from ingest_service.tenancy import match_tenant
from ingest_service.tracing import AGENT_ID, BATCH_POINTS, BATCH_SEQUENCE, failed, stage
from ingest_service.validation import Validator
from welltegra.ingest.v1 import ingest_pb2

__all__ = ["SERVICE_NAME", "IngestPipeline", "new_ingestion_id"]

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
MAX_AGENT_ID = 128


def new_ingestion_id(now: datetime | None = None) -> str:
    """An id like ``ing_20251106_143000_3fa94c1b``: sortable by time, unique by its random tail."""
    return f"ing_{(now or datetime.now(UTC)):%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


def _parse(message_type: type[Any], raw: bytes) -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(
            f"request is not a valid {message_type.DESCRIPTOR.name} message: {exc}"
        ) from exc


class IngestPipeline:
    """Runs each request through limits, validation, storage and cache, and audits it."""

    def __init__(
        self,
        storage: Storage,
        cache: LatestValueCache | None,
        validator: Validator,
        limiter: Limiter,
        audit: AuditLog,
        metrics: GatewayMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._storage = storage
        self._cache = cache
        self._validator = validator
        self._limiter = limiter
        self._audit = audit
        self._metrics = metrics if metrics is not None else GatewayMetrics()
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving ``welltegra.ingest.v1.IngestService``."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Ingest": grpc.stream_unary_rpc_method_handler(
                    self.ingest, response_serializer=ingest_pb2.IngestResponse.SerializeToString
                ),
                "IngestRealtime": grpc.unary_unary_rpc_method_handler(
                    self.ingest_realtime,
                    response_serializer=ingest_pb2.IngestRealtimeResponse.SerializeToString,
                ),
            },
        )

    async def ingest_realtime(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.IngestRealtimeResponse:
        started = time.perf_counter()
        principal = current_principal.get()
        ingestion_id = new_ingestion_id()
        event = _call_event("IngestRealtime", principal, context, ingestion_id)
        try:
            await self._storage.check_provisioned(principal.tenant_id)
            with stage(self._tracer, "limits"):
                await self._limiter.admit(principal.tenant_id, len(raw))
            request = _parse(ingest_pb2.IngestRealtimeRequest, raw)
            outcome = await self._run(
                principal, request.tenant_id, request.data_points, ingestion_id
            )
        except GatewayError as error:
            await self._refuse(context, event, error)
        self._record(_audited(event, outcome))
        summary = f"Ingested {outcome.accepted} data point{'' if outcome.accepted == 1 else 's'}"
        if outcome.duplicate:
            summary += f", {outcome.duplicate} already stored"
        if outcome.rejected:
            summary += f", rejected {outcome.rejected}"
        return ingest_pb2.IngestRealtimeResponse(
            status="partial" if outcome.rejected else "success",
            message=summary,
            tenant_id=principal.tenant_id,
            ingestion_id=ingestion_id,
            accepted_count=outcome.accepted,
            rejected_count=outcome.rejected,
            duplicate_count=outcome.duplicate,
            processing_time_ms=round((time.perf_counter() - started) * 1000),
            rejections=outcome.rejections,
        )

    async def ingest(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.IngestResponse:
        principal = current_principal.get()
        response = ingest_pb2.IngestResponse()
        async for index, raw in _enumerate(requests, start=1):
            ingestion_id = new_ingestion_id()
            event = _call_event("Ingest", principal, context, ingestion_id)
            with stage(
                self._tracer,
                "ingest batch",
                {"welltegra.batch.index": index, "welltegra.batch.bytes": len(raw)},
            ) as span:
                try:
                    await self._storage.check_provisioned(principal.tenant_id)
                    with stage(self._tracer, "limits"):
                        await self._limiter.admit(
                            principal.tenant_id, len(raw), new_call=index == 1
                        )
                    batch = _parse(ingest_pb2.IngestRequest, raw)
                    event = _with_batch(event, batch)
                    _trace_batch(span, batch)
                    _check_batch_identity(batch)
                    outcome = await self._run(
                        principal,
                        batch.tenant_id,
                        batch.data_points,
                        ingestion_id,
                        agent_id=batch.agent_id,
                        batch_sequence=batch.batch_sequence,
                        gaps=batch.data_gaps,
                        historical=batch.historical,
                    )
                except GatewayError as error:
                    # Which batch of the stream failed: its position always (it may be refused
                    # before it is parsed), its sequence number when it could be read.
                    error.metadata["batch_index"] = str(index)
                    if event.batch_sequence is not None:
                        error.metadata["batch_sequence"] = str(event.batch_sequence)
                    failed(span, error.reason)
                    await self._refuse(context, event, error)
                span.set_attributes(
                    {
                        "welltegra.ingestion_id": ingestion_id,
                        "welltegra.batch.accepted": outcome.accepted,
                        "welltegra.batch.rejected": outcome.rejected,
                        "welltegra.batch.duplicate": outcome.duplicate,
                        "welltegra.batch.duplicate_batch": outcome.duplicate_batch,
                    }
                )
            self._record(_audited(event, outcome))
            response.batches.append(
                ingest_pb2.BatchResult(
                    batch_sequence=batch.batch_sequence,
                    accepted_count=outcome.accepted,
                    rejected_count=outcome.rejected,
                    duplicate_count=outcome.duplicate,
                    duplicate_batch=outcome.duplicate_batch,
                    rejections=outcome.rejections,
                    ingestion_id=ingestion_id,
                    gap_count=outcome.gaps,
                )
            )
            response.accepted_count += outcome.accepted
            response.rejected_count += outcome.rejected
            response.duplicate_count += outcome.duplicate
        return response

    async def _run(
        self,
        principal: Principal,
        body_tenant: str,
        points: Any,
        ingestion_id: str,
        agent_id: str | None = None,
        batch_sequence: int | None = None,
        gaps: Any = None,
        historical: bool = False,
    ) -> _Outcome:
        """``gaps`` and ``historical`` come with Ingest batches; IngestRealtime has neither."""
        match_tenant(principal.tenant_id, body_tenant)
        with stage(self._tracer, "validate", {BATCH_POINTS: len(points)}) as span:
            validated = self._validator.validate(points, gaps=gaps)
            span.set_attribute("welltegra.batch.rejected", len(validated.rejected))
        self._metrics.batch_points.observe(len(points))
        with self._metrics.storage_seconds.time():
            stored = await self._storage.store_batch(
                principal.tenant_id, validated, ingestion_id, agent_id, batch_sequence
            )
        # A backlog batch's points are older than what the agent sends live. The cache keeps
        # only newer timestamps, but after an outage its keys may have expired, and old points
        # would pass for the latest values: they are not offered to it at all.
        if self._cache is not None and not stored.duplicate_batch and not historical:
            await self._cache.update(principal.tenant_id, validated.accepted)  # its own span
        rejections = [
            ingest_pb2.Rejection(index=q.index, field=q.field, reason=q.reason)
            for q in validated.rejected
        ]
        return _Outcome(stored, rejections)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        event: AuditEvent,
        error: GatewayError,
    ) -> None:
        self._record(
            replace(event, outcome="refused", reason=error.reason, message=error.message[:1000])
        )
        await abort(context, error)

    def _record(self, event: AuditEvent) -> None:
        """The one place a call's (or batch's) outcome is recorded: audit row and metrics."""
        self._audit.record(event)
        self._metrics.record(event)


class _Outcome:
    """A stored batch's counts plus the rejections to report."""

    __slots__ = ("accepted", "duplicate", "duplicate_batch", "gaps", "rejected", "rejections")

    def __init__(self, stored: BatchOutcome, rejections: list[ingest_pb2.Rejection]) -> None:
        self.accepted = stored.accepted
        self.rejected = stored.rejected
        self.duplicate = stored.duplicate
        self.duplicate_batch = stored.duplicate_batch
        self.gaps = stored.gaps
        self.rejections = rejections


async def _enumerate(items: AsyncIterator[bytes], start: int) -> AsyncIterator[tuple[int, bytes]]:
    index = start
    async for item in items:
        yield index, item
        index += 1


def _trace_batch(span: Span, batch: ingest_pb2.IngestRequest) -> None:
    """What the batch span says of a parsed batch: who sent it and how much, no values."""
    span.set_attributes(
        {
            BATCH_SEQUENCE: batch.batch_sequence,
            AGENT_ID: batch.agent_id[:MAX_AGENT_ID],
            BATCH_POINTS: len(batch.data_points),
            "welltegra.batch.gap_records": len(batch.data_gaps),
            "welltegra.batch.historical": batch.historical,
        }
    )


def _check_batch_identity(batch: ingest_pb2.IngestRequest) -> None:
    violations = []
    if not batch.agent_id:
        violations.append(FieldViolation("agent_id", "is required"))
    elif len(batch.agent_id) > MAX_AGENT_ID or "\x00" in batch.agent_id:
        violations.append(
            FieldViolation("agent_id", f"must be at most {MAX_AGENT_ID} characters, without NUL")
        )
    if batch.batch_sequence < 1:
        violations.append(FieldViolation("batch_sequence", "must be 1 or more"))
    if violations:
        raise InvalidRequest("Invalid batch", violations)


def _call_event(
    action: str,
    principal: Principal,
    context: grpc.aio.ServicerContext[Any, Any],
    ingestion_id: str,
) -> AuditEvent:
    """The audit event of one call (or one batch), refused until the pipeline says otherwise."""
    return AuditEvent(
        action=action,
        outcome="refused",
        tenant_id=principal.tenant_id,
        subject=principal.subject,
        peer=context.peer(),
        ingestion_id=ingestion_id,
    )


def _with_batch(event: AuditEvent, batch: ingest_pb2.IngestRequest) -> AuditEvent:
    return replace(
        event,
        agent_id=batch.agent_id[:MAX_AGENT_ID],
        batch_sequence=batch.batch_sequence,
        historical=batch.historical,
    )


def _audited(event: AuditEvent, outcome: _Outcome) -> AuditEvent:
    if outcome.duplicate_batch:
        result = "duplicate"
    elif outcome.rejected:
        result = "partial"
    else:
        result = "accepted"
    return replace(
        event,
        outcome=result,
        accepted_count=outcome.accepted,
        rejected_count=outcome.rejected,
        duplicate_count=outcome.duplicate,
        gap_count=outcome.gaps,
    )
