"""Tracing's setup and its span helpers: off unless an OTLP endpoint is set, the standard
variables honoured, errors reported by reason only, and the agent's call and batch spans."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc import trace_exporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from edge.buffer import PendingBatch
from edge.uploader import CallTrace, Lane
from ingest_service.auth import AuthInterceptor, Principal
from ingest_service.errors import InvalidRequest, InvalidToken
from ingest_service.tracing import (
    AGENT_SERVICE,
    BATCH_SEQUENCE,
    GATEWAY_SERVICE,
    Tracing,
    context_from_metadata,
    metadata_with_context,
    stage,
    tracing_requested,
)
from welltegra.ingest.v1 import ingest_pb2

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)
NOWHERE = "http://127.0.0.1:9"  # nothing listens; no span is ever sent there in these tests


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def recorded() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": NOWHERE}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": NOWHERE}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": NOWHERE, "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": NOWHERE, "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": NOWHERE, "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_with_an_endpoint_and_not_disabled(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing_requested(environ) is on


def test_off_there_is_no_exporter_and_spans_record_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_exporter(*args: object, **kwargs: object) -> None:
        raise AssertionError("an exporter was created")

    monkeypatch.setattr(trace_exporter.OTLPSpanExporter, "__init__", no_exporter)
    tracing = Tracing.from_environ(GATEWAY_SERVICE)
    assert not tracing.enabled
    assert isinstance(tracing.tracer, trace.NoOpTracer)
    with stage(tracing.tracer, "store") as span:
        assert not span.is_recording()
    tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "service"),
    [
        ({}, AGENT_SERVICE),
        ({"OTEL_SERVICE_NAME": "site-7-agent"}, "site-7-agent"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=edge,deployment.environment=prod"}, "edge"),
    ],
)
def test_on_the_service_name_defaults_and_the_environment_overrides_it(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], service: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", NOWHERE)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    tracing = Tracing.from_environ(AGENT_SERVICE)
    try:
        assert tracing.enabled
        assert tracing.tracer.resource.attributes["service.name"] == service  # type: ignore[attr-defined]
    finally:
        tracing.shutdown()
    assert not tracing.enabled
    tracing.shutdown()  # twice is fine


def test_a_failed_stage_says_its_reason_and_never_the_message(
    recorded: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = recorded
    with pytest.raises(InvalidRequest), stage(tracer, "validate"):
        raise InvalidRequest("data_points[0].value 1234.5678 is out of range")
    with pytest.raises(ValueError), stage(tracer, "seal"):
        raise ValueError("value 1234.5678")
    validate, seal = exporter.get_finished_spans()
    assert validate.status.status_code is StatusCode.ERROR
    assert validate.status.description == "validation_error"
    assert seal.status.description == "ValueError"
    assert not validate.events and not seal.events  # no exception event with its message


def batch(sequence: int, points: int = 3) -> PendingBatch:
    return PendingBatch(
        sequence=sequence, sealed_at=1_700_000_000.0, point_count=points, gap_count=0,
        first_ts=1_699_999_999.5, last_ts=1_700_000_000.0, payload=b"",
    )


def test_a_call_span_carries_its_context_and_one_span_per_batch(
    recorded: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = recorded
    spans = CallTrace(tracer, Lane.BACKLOG, "agent-1", "gateway:443")
    metadata = spans.metadata((("authorization", "Bearer secret-token"),))
    spans.sent(batch(7))
    spans.sent(batch(8))
    spans.acknowledged(
        [ingest_pb2.BatchResult(batch_sequence=7, accepted_count=2, duplicate_count=1)]
    )
    spans.end(grpc.StatusCode.CANCELLED)  # already ended: no effect
    finished = {
        (s.name, s.attributes.get(BATCH_SEQUENCE)): s for s in exporter.get_finished_spans()
    }
    call = finished[("welltegra.ingest.v1.IngestService/Ingest", None)]
    seven, eight = finished[("upload batch", 7)], finished[("upload batch", 8)]

    # The metadata continues the call span's trace; the token stays where it was, only there.
    parent = trace.get_current_span(context_from_metadata(metadata)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (call.context.trace_id, call.context.span_id)
    assert metadata[0] == ("authorization", "Bearer secret-token")
    assert seven.parent is not None and seven.parent.span_id == call.context.span_id
    assert call.attributes["welltegra.call.batches"] == 2
    assert call.attributes["welltegra.call.points"] == 6
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert call.status.status_code is StatusCode.UNSET
    assert seven.attributes["welltegra.lane"] == "backlog"
    assert seven.attributes["welltegra.batch.sealed_at"] == "2023-11-14T22:13:20+00:00"
    assert seven.attributes["welltegra.batch.first_point_at"] == "2023-11-14T22:13:19.500000+00:00"
    assert seven.attributes["welltegra.batch.accepted"] == 2
    assert seven.status.status_code is StatusCode.UNSET
    # The gateway's response did not list batch 8: it was not acknowledged.
    assert eight.status.status_code is StatusCode.ERROR
    for span in exporter.get_finished_spans():
        assert all("secret-token" not in str(value) for value in span.attributes.values())


def test_a_failed_call_fails_its_open_batches_with_the_reason(
    recorded: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = recorded
    spans = CallTrace(tracer, Lane.LIVE, "agent-1", "gateway:443")
    spans.sent(batch(1))
    spans.end(grpc.StatusCode.UNAVAILABLE, "storage_unavailable")
    upload, call = exporter.get_finished_spans()
    assert upload.status.description == "storage_unavailable"
    assert call.status.description == "storage_unavailable"
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


def test_untraced_calls_send_no_context() -> None:
    spans = CallTrace(trace.NoOpTracer(), Lane.LIVE, "agent-1", "gateway:443")
    assert spans.metadata((("authorization", "Bearer t"),)) == (("authorization", "Bearer t"),)
    spans.sent(batch(1))
    spans.acknowledged([ingest_pb2.BatchResult(batch_sequence=1)])


class _Verifier:
    async def verify(self, token: str) -> Principal:
        if token == "good":
            return Principal("t_traced", "client", frozenset({"api:ingest"}))
        raise InvalidToken("access token is invalid")


class _Audit:
    def record(self, event: object) -> None:
        pass


async def test_the_gateway_continues_the_callers_trace_and_ends_refused_calls_failed(
    recorded: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = recorded

    async def realtime(request: bytes, context: object) -> bytes:
        with stage(tracer, "store"):
            return b""

    service = "welltegra.ingest.v1.IngestService"
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(_Verifier(), _Audit(), f"/{service}/", tracer=tracer)]  # type: ignore[arg-type]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service, {"IngestRealtime": grpc.unary_unary_rpc_method_handler(realtime)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{service}/IngestRealtime")
            with tracer.start_as_current_span("client") as client:
                await call(b"", metadata=metadata_with_context([("authorization", "Bearer good")]))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(b"", metadata=metadata_with_context([("authorization", "Bearer x")]))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        await asyncio.sleep(0.2)  # the server ends its spans after the client has its answer
    finally:
        await server.stop(None)
    spans = exporter.get_finished_spans()
    calls = [s for s in spans if s.name == f"{service}/IngestRealtime"]
    assert len(calls) == 2
    for span in calls:
        assert span.kind is trace.SpanKind.SERVER
        assert span.parent is not None and span.parent.span_id == client.get_span_context().span_id
    served, refused_call = sorted(calls, key=lambda s: s.start_time or 0)
    assert served.attributes["rpc.grpc.status_code"] == 0
    assert served.attributes["welltegra.tenant"] == "t_traced"
    assert refused_call.status.status_code is StatusCode.ERROR
    assert refused_call.status.description == "UNAUTHENTICATED"
    children = {
        (s.name, s.parent.span_id if s.parent else None): s for s in spans if s.name != "client"
    }
    assert ("store", served.context.span_id) in children
    assert ("auth", served.context.span_id) in children
    failed_auth = children[("auth", refused_call.context.span_id)]
    assert failed_auth.status.description == "invalid_token"
