"""Traces over OTLP, set up in this one place for both processes: the gateway and the edge agent.

**Off by default.** Tracing starts only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its traces-only
form ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and never when ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none``. Off, there is no exporter, no span processor and no thread: the
tracer is the API's no-op tracer, whose spans record nothing. Spans are made per call, per batch
and per SQL statement, never per data point, so even on, tracing adds a few spans to the
milliseconds a batch takes.

**On**, spans go through a ``BatchSpanProcessor`` (``OTEL_BSP_*``) to the OTLP gRPC exporter, which
reads the standard ``OTEL_EXPORTER_OTLP_*`` variables itself (endpoint, headers, certificate,
timeout, compression; an ``http://`` endpoint is plaintext). The sampler comes from
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (default: parent-based, always on), the resource
from ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME``; without a name the service is
``welltegra-agent`` or ``welltegra-gateway``. Trace context crosses the wire as W3C ``traceparent``
and ``tracestate`` gRPC metadata (``OTEL_PROPAGATORS`` may choose others). ``shutdown()`` flushes
what is queued: a process's stop waits at most the exporter's timeout for its collector.

Each process owns its tracer provider instead of installing the global one, as each owns its
metrics registry: two agents or gateways in one process (as in the tests) keep their spans
apart, and a stopped one can start again.

**What a span may carry**: counts, sequence numbers, ids, times, SQL statement *names* and error
reasons. Never a data point's value, a token or a bind parameter; exceptions are not recorded
(their messages may quote a value): a failed span carries the error's reason only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

__all__ = [
    "AGENT_ID",
    "AGENT_SERVICE",
    "BATCH_POINTS",
    "BATCH_SEQUENCE",
    "GATEWAY_SERVICE",
    "LANE",
    "TENANT",
    "Tracing",
    "context_from_metadata",
    "failed",
    "metadata_with_context",
    "reason_of",
    "stage",
    "tracing_requested",
    "within",
]

log = logging.getLogger(__name__)

AGENT_SERVICE = "welltegra-agent"
GATEWAY_SERVICE = "welltegra-gateway"
INSTRUMENTATION = "welltegra"

# Attributes both sides use, so a batch is found by the same key in the agent's and the
# gateway's spans.
AGENT_ID = "welltegra.agent.id"
BATCH_SEQUENCE = "welltegra.batch.sequence"
BATCH_POINTS = "welltegra.batch.points"
LANE = "welltegra.lane"
TENANT = "welltegra.tenant"


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


class Tracing:
    """One process's tracing: the tracer its parts make spans with, and the provider that
    exports them (None when tracing is off)."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self._provider = provider

    @classmethod
    def off(cls) -> Tracing:
        return cls(trace.NoOpTracer())

    @classmethod
    def from_environ(cls, service_name: str) -> Tracing:
        """Tracing as the ``OTEL_*`` environment asks (see the module docstring);
        ``service_name`` unless ``OTEL_SERVICE_NAME`` or the resource attributes name one."""
        if not tracing_requested():
            return cls.off()
        # Imported only when on: the exporter pulls in the OTLP protobuf modules.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter_name not in ("otlp", ""):
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; using otlp", exporter_name)
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        log.info(
            "tracing on: spans of %s go over OTLP/gRPC to %s",
            resource.attributes.get(SERVICE_NAME),
            endpoint,
        )
        return cls(provider.get_tracer(INSTRUMENTATION), provider)

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def shutdown(self) -> None:
        """Export what is queued and stop; blocking (run it in a thread from async code).
        Safe to call twice, and when tracing is off."""
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.shutdown()
            self.tracer = trace.NoOpTracer()


def metadata_with_context(
    metadata: Sequence[tuple[str, str]], context: Context | None = None
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the trace context (``traceparent``, ``tracestate``) of ``context``, or
    of the current span; unchanged when there is no span to continue."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return (*metadata, *carrier.items())


def context_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context, read from a call's metadata (an empty context if none)."""
    carrier = {
        key: value for key, value in metadata or () if isinstance(value, str)
    }  # binary (-bin) entries never carry trace context
    return propagate.extract(carrier)


def failed(span: Span, reason: str) -> None:
    """Mark ``span`` failed with a short reason (an error's reason code, never its message)."""
    span.set_status(Status(StatusCode.ERROR, reason))


def reason_of(error: BaseException) -> str:
    """What a span says about an error: its ``reason`` code when it has one, else its type."""
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) and reason else type(error).__name__


@contextlib.contextmanager
def stage(
    tracer: Tracer,
    name: str,
    attributes: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[Span]:
    """A span around one stage, current inside the block. An error leaving the block marks it
    failed with the error's reason; the exception itself (its message) is not recorded."""
    if isinstance(tracer, trace.NoOpTracer):
        yield trace.INVALID_SPAN  # tracing off: not even the no-op context switch
        return
    with tracer.start_as_current_span(
        name,
        kind=kind,
        attributes=dict(attributes) if attributes else None,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as error:
            if not _failed_already(span):  # keep the reason the block gave, if it gave one
                failed(span, reason_of(error))
            raise


def _failed_already(span: Span) -> bool:
    status = getattr(span, "status", None)  # recording (SDK) spans have one
    return isinstance(status, Status) and status.status_code is StatusCode.ERROR


@contextlib.contextmanager
def within(span: Span) -> Iterator[Span]:
    """``span`` as the current span inside the block, without ending it or recording errors."""
    with trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    ):
        yield span
