"""Encryption at rest: stored values are ciphertext bound to their row, keys rotate without
losing old rows, shredding makes a tenant's data unreadable, the operator's query decrypts
exactly what was ingested, and the master key never leaks."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import sys
from pathlib import Path

import asyncpg
import grpc
import pytest

from ingest_service.config import GatewayConfig
from ingest_service.crypto import KeyringError
from ingest_service.errors import UnknownTenant
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import auth, point
from .test_refusals import rich_status


async def ingest(
    stub: ingest_pb2_grpc.IngestServiceStub, token: str, *points: ingest_pb2.DataPoint
) -> None:
    response = await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=list(points)), metadata=auth(token)
    )
    assert response.accepted_count == len(points)


async def test_stored_values_are_ciphertext_bound_to_their_row(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    await ingest(stub, make_token(tenant), point(0, 6750.5), point(1, 1234.25))
    rows = await db.fetch(
        f'SELECT ts, key_version, sealed FROM "{tenant}_streams".real_time_parameters ORDER BY ts'
    )
    for row, value in zip(rows, (6750.5, 1234.25), strict=True):
        assert row["key_version"] == 1
        assert struct.pack("<d", value) not in row["sealed"]
        assert b"SCADA_OPC_UA" not in row["sealed"] and b"GOOD" not in row["sealed"]
    # Move the first row's ciphertext onto the second row: it must not open there.
    await db.execute(
        f'UPDATE "{tenant}_streams".real_time_parameters SET sealed = $1 WHERE ts = $2',
        rows[0]["sealed"],
        rows[1]["ts"],
    )
    with pytest.raises(KeyringError, match="does not open"):
        _ = [p async for p in gateway.storage.read_points(tenant)]


async def test_rotation_keeps_old_rows_readable(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    token = make_token(tenant)
    await ingest(stub, token, point(0, 100.0))
    assert await gateway.storage.keys.rotate(tenant) == 2
    await ingest(stub, token, point(1, 200.0))
    versions = await db.fetch(
        f'SELECT key_version FROM "{tenant}_streams".real_time_parameters ORDER BY ts'
    )
    assert [r["key_version"] for r in versions] == [1, 2]
    values = [p.value async for p in gateway.storage.read_points(tenant)]
    assert values == [100.0, 200.0]
    await gateway.audit.flush()
    assert (
        await db.fetchval(
            "SELECT count(*) FROM system_monitoring.audit_log"
            " WHERE tenant_id = $1 AND action = 'tenants rotate-key'",
            tenant,
        )
        == 1
    )


async def test_shredding_makes_the_tenant_unreadable_and_refuses_writes(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    token = make_token(tenant)
    await ingest(stub, token, point(0))
    await gateway.storage.keys.rotate(tenant)
    assert await gateway.storage.keys.shred(tenant) == 2
    assert (
        await db.fetchval(
            "SELECT count(*) FROM welltegra.tenant_keys WHERE tenant_id = $1"
            " AND wrapped_key IS NOT NULL",
            tenant,
        )
        == 0
    )
    with pytest.raises(UnknownTenant, match="shredded"):
        _ = [p async for p in gateway.storage.read_points(tenant)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ingest(stub, token, point(1))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rich_status(refused.value)[0] == "unknown_tenant"
    assert "shredded" in refused.value.details()
    assert (
        await db.fetchval(
            "SELECT count(*) FROM system_monitoring.audit_log"
            " WHERE tenant_id = $1 AND action = 'tenants shred'",
            tenant,
        )
        == 1
    )


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest_service.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_query_returns_exactly_what_was_ingested_decrypted(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    database_url: str,
    master_key: str,
    tmp_path: Path,
) -> None:
    sent = [
        point(0, 100.0, unit="bar"),
        point(60, 6750.5),
        point(0, 100.0, parameter="downhole_temperature", unit="degC"),
    ]
    await ingest(stub, make_token(tenant), *sent)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "WELLTEGRA_MASTER_KEY": master_key,
    }
    code, out, err = await run_cli(
        "query", "--tenant", tenant, "--format", "json", "--data-dir", str(tmp_path), env=env
    )
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(p["parameter_name"], p["value"], p["unit"], p["original_unit"]) for p in got] == [
        ("downhole_temperature", pytest.approx(212.0), "degF", "degC"),
        ("wellhead_pressure", pytest.approx(1450.377377), "psi", "bar"),
        ("wellhead_pressure", 6750.5, "psi", "psi"),
    ]
    assert all(p["quality_code"] == "GOOD" and p["source"] == "SCADA_OPC_UA" for p in got)
    code, out, _ = await run_cli(
        "query",
        "--tenant",
        tenant,
        "--parameter",
        "wellhead_pressure",
        "--since",
        "2025-11-06T14:30:30Z",
        "--data-dir",
        str(tmp_path),
        env=env,
    )
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("well_id,parameter_name,timestamp,value")
    assert len(lines) == 2 and ",6750.5," in lines[1]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("c2hvcnQ=", "must be 32 bytes, not 5"),
        ("not base64 at all!", "is not valid base64"),
    ],
)
async def test_a_bad_master_key_is_a_clear_start_error_that_never_shows_the_key(
    gateway_config: GatewayConfig,
    database_url: str,
    key: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WELLTEGRA_MASTER_KEY", key)
    gateway = Gateway(gateway_config, database_url, None)
    with pytest.raises(Exception) as error:
        await gateway.start()
    await gateway.stop()
    assert type(error.value).__name__ == "ConfigError"
    assert message in str(error.value) and key not in str(error.value)
    assert key not in caplog.text


async def test_another_master_key_cannot_unwrap_the_tenants_keys(
    gateway_config: GatewayConfig,
    database_url: str,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other_key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("WELLTEGRA_MASTER_KEY", other_key)
    other = Gateway(gateway_config, database_url, None)
    await other.start()  # says so loudly, but other tenants (other keys) may share the database
    try:
        assert "the master key does not open the data keys" in caplog.text
        assert tenant in await other.storage.keys.tenants_it_cannot_open()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ingest(
                    ingest_pb2_grpc.IngestServiceStub(channel), make_token(tenant), point(0)
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # never UNKNOWN, never unsealed
        with pytest.raises(KeyringError):
            await other.storage.keys.rotate(tenant)  # no key added under the wrong master key
    finally:
        await other.stop(grace=1)
    assert other_key not in caplog.text
