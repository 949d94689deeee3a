"""REST through a real Envoy (TLS 1.3, transcoding) to the real gateway: the documented answers,
every documented error with its exact status and body, and native gRPC on the same listener."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from ingest_service.envoy_front import EnvoyFront
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import stored_count

REALTIME = "/v1/ingest/realtime"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def spec_payload(tenant: str, points: int = 1) -> dict[str, Any]:
    """The spec's example payload (section 3.1)."""
    return {
        "tenant_id": tenant,
        "data_points": [
            {
                "well_id": "WELL_001",
                "timestamp": f"2025-11-06T14:30:{i % 60:02d}.{i // 60:06d}Z",
                "parameter_name": "wellhead_pressure",
                "value": 6750.5,
                "unit": "psi",
                "quality_code": "GOOD",
                "source": "SCADA_OPC_UA",
            }
            for i in range(points)
        ],
        "ingestion_timestamp": "2025-11-06T14:30:00Z",
    }


async def run(*command: str) -> tuple[int, str, str]:
    """Run a client binary without blocking the event loop the in-process gateway serves on."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def post_uploading(
    client: httpx.AsyncClient, path: str, content: Any, headers: dict[str, str]
) -> httpx.Response:
    """POST, sending again if the connection was reset before the answer could be read: a
    server that refuses a body it has not finished reading (413) closes the connection, and
    the unread bytes can make the peer's TCP reset it before the client reads the 413. A real
    client retries the same way; what is asserted is the answer it then gets."""
    attempts = 5
    for attempt in range(attempts):
        body = content() if callable(content) else content
        try:
            return await client.post(path, content=body, headers=headers)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_spec_example_is_stored_and_answered_as_documented(
    rest: httpx.AsyncClient, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    response = await rest.post(
        REALTIME, json=spec_payload(tenant, 150), headers=bearer(make_token(tenant))
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "success"
    assert body["message"] == "Ingested 150 data points"
    assert body["tenant_id"] == tenant
    assert body["ingestion_id"].startswith("ing_")
    assert body["accepted_count"] == 150 and body["rejected_count"] == 0
    assert isinstance(body["processing_time_ms"], int)  # int32: a JSON number, not a string
    assert await stored_count(db, tenant) == 150
    tls_version = response.extensions["network_stream"].get_extra_info("ssl_object").version()
    assert tls_version == "TLSv1.3"


def too_many_points(tenant: str) -> dict[str, Any]:
    return spec_payload(tenant, 1001)


def string_for_number(tenant: str) -> dict[str, Any]:
    payload = spec_payload(tenant)
    payload["data_points"][0]["value"] = "6750.5 psi"
    return payload


def missing_value(tenant: str) -> dict[str, Any]:
    payload = spec_payload(tenant, 4)
    del payload["data_points"][3]["value"]
    return payload


# (case, body from tenant (dict, or raw bytes), token claims (None: no token), path,
#  status, error code, (field, error) expected among details or None)
ERROR_CASES: list[tuple[str, Any, dict[str, Any] | None, str, int, str, Any]] = [
    (
        "missing value",
        missing_value,
        {},
        REALTIME,
        400,
        "validation_error",
        ("data_points[3].value", "is required"),
    ),
    (
        "string for number",
        string_for_number,
        {},
        REALTIME,
        400,
        "validation_error",
        ("data_points[0].value", 'invalid value "6750.5 psi" for type TYPE_DOUBLE'),
    ),
    (
        "1001 points",
        too_many_points,
        {},
        REALTIME,
        400,
        "validation_error",
        ("data_points", "must hold 1 to 1000 points, not 1001"),
    ),
    ("malformed JSON", lambda t: b'{"tenant_id": ', {}, REALTIME, 400, "validation_error", None),
    ("JSON array", lambda t: b"[1, 2]", {}, REALTIME, 400, "validation_error", None),
    ("no token", spec_payload, None, REALTIME, 401, "invalid_token", None),
    (
        "expired token",
        spec_payload,
        {"exp": int(time.time()) - 3600},
        REALTIME,
        401,
        "invalid_token",
        None,
    ),
    (
        "tenant mismatch",
        lambda t: spec_payload("operator_other"),
        {},
        REALTIME,
        403,
        "tenant_mismatch",
        None,
    ),
    (
        "insufficient scope",
        spec_payload,
        {"scope": "api:read"},
        REALTIME,
        403,
        "insufficient_scope",
        None,
    ),
    (
        "10 MB + 1 byte",
        lambda t: b" " * (10 * 1024 * 1024 + 1),
        {},
        REALTIME,
        413,
        "payload_too_large",
        None,
    ),
    ("unknown path", spec_payload, {}, "/v1/ingest/nothing", 404, "not_found", None),
    (
        "unknown query parameter",
        spec_payload,
        {},
        REALTIME + "?debug=1",
        400,
        "validation_error",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "claims", "path", "status", "code", "detail"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_documented_errors(
    rest: httpx.AsyncClient,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    body: Any,
    claims: dict[str, Any] | None,
    path: str,
    status: int,
    code: str,
    detail: Any,
) -> None:
    payload = body(tenant)
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    if claims is not None:
        headers |= bearer(make_token(tenant, **claims))
    response = await post_uploading(rest, path, content, headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["error"] == code
    assert isinstance(answer["message"], str) and answer["message"]
    assert set(answer) <= {"error", "message", "details", "retry_after_seconds"}
    if detail is not None:
        assert {"field": detail[0], "error": detail[1]} in answer["details"]
    assert "grpc-status" not in response.headers
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer ")
    assert await stored_count(db, tenant) == 0


async def test_gateway_down_is_503(tmp_path: Path, make_token: TokenFactory) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    front = EnvoyFront(tmp_path, "127.0.0.1:0", upstream_port=dead_port)
    front.start()
    try:
        context = ssl.create_default_context(cafile=str(front.certificate))
        async with httpx.AsyncClient(verify=context, timeout=30) as client:
            response = await client.post(
                f"https://localhost:{front.port}{REALTIME}",
                json=spec_payload("operator_x"),
                headers=bearer(make_token("operator_x")),
            )
    finally:
        front.stop()
    assert response.status_code == 503
    assert response.json()["error"] == "service_unavailable"


def test_a_tls_1_2_client_is_refused(envoy_front: EnvoyFront) -> None:
    context = ssl.create_default_context(cafile=str(envoy_front.certificate))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", envoy_front.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")


async def test_curl(envoy_front: EnvoyFront, tenant: str, make_token: TokenFactory) -> None:
    url = f"https://localhost:{envoy_front.port}{REALTIME}"
    common = [
        "curl",
        "-sS",
        "--tlsv1.3",
        "--cacert",
        str(envoy_front.certificate),
        "-H",
        "content-type: application/json",
        "-w",
        "\n%{http_code}",
    ]
    _, out, _ = await run(
        *common,
        "-H",
        f"authorization: Bearer {make_token(tenant)}",
        "--data",
        json.dumps(spec_payload(tenant)),
        url,
    )
    body, status = out.rsplit("\n", 1)
    assert status == "200" and json.loads(body)["accepted_count"] == 1
    _, out, _ = await run(*common, "--data", "{}", url)
    body, status = out.rsplit("\n", 1)
    assert status == "401" and json.loads(body)["error"] == "invalid_token"


async def test_native_grpc_stream_through_envoy_loses_and_repeats_nothing(
    envoy_front: EnvoyFront, tenant: str, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    batches, per_batch = 2000, 5

    async def stream() -> AsyncIterator[ingest_pb2.IngestRequest]:
        for seq in range(1, batches + 1):
            points = []
            for i in range(per_batch):
                point = ingest_pb2.DataPoint(
                    well_id=f"WELL_{i}",
                    parameter_name="flow_rate",
                    value=float(seq),
                    unit="bbl/day",
                )
                point.timestamp.FromSeconds(1_762_439_400 + seq)
                points.append(point)
            yield ingest_pb2.IngestRequest(
                agent_id="agent-envoy", batch_sequence=seq, data_points=points
            )

    credentials = grpc.ssl_channel_credentials(envoy_front.certificate.read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{envoy_front.port}", credentials) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response = await stub.Ingest(
            stream(), metadata=(("authorization", f"Bearer {make_token(tenant)}"),), timeout=300
        )
        assert len(response.batches) == batches
        assert response.accepted_count == batches * per_batch and response.duplicate_count == 0
        again = await stub.Ingest(
            stream(), metadata=(("authorization", f"Bearer {make_token(tenant)}"),), timeout=300
        )
        assert again.accepted_count == 0 and again.duplicate_count == batches * per_batch
    assert await stored_count(db, tenant) == batches * per_batch


async def test_grpcurl_through_envoy(
    envoy_front: EnvoyFront, tenant: str, make_token: TokenFactory
) -> None:
    address = f"localhost:{envoy_front.port}"
    base = [GRPCURL, "-cacert", str(envoy_front.certificate)]
    _, listed, errors = await run(*base, address, "list")
    assert "welltegra.ingest.v1.IngestService" in listed.split(), errors
    _, described, _ = await run(*base, address, "describe", "welltegra.ingest.v1.IngestService")
    assert "rpc IngestRealtime" in described
    _, message, _ = await run(*base, address, "describe", "welltegra.ingest.v1.DataPoint")
    assert "optional double value = 4;" in message
    code, called, errors = await run(
        *base,
        "-H",
        f"authorization: Bearer {make_token(tenant)}",
        "-d",
        json.dumps(spec_payload(tenant)),
        address,
        "welltegra.ingest.v1.IngestService/IngestRealtime",
    )
    assert code == 0, errors
    assert json.loads(called)["accepted_count"] == 1
