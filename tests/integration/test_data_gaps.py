"""Data gaps (``IngestRequest.data_gaps``): an agent's records of the points it lost, stored once
in the tenant's ``data_gaps`` with the batch that carried them, refused field by field when
malformed, fenced per tenant by row-level security, and listed by ``welltegra-ingest gaps``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes

from ingest_service.server import Gateway
from ingest_service.storage import TENANT_FENCE
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_historical import HISTORICAL_SUFFIX, ingest_raw
from .test_ingest import BASE, auth, point, stored_count, stream_of
from .test_refusals import rich_status


@pytest.fixture
async def neighbour(gateway: Gateway) -> AsyncIterator[str]:
    """A second tenant, for the row-level security fence."""
    name = "gaps_neighbour"
    await gateway.storage.create_tenant(name)
    yield name
    await gateway.storage.drop_tenant(name)


def gap(
    first_s: int = 0,
    last_s: int = 59,
    count: int = 60,
    reason: str = "size_cap",
    well: str = "WELL_001",
    parameter: str = "wellhead_pressure",
    source: str = "SCADA_OPC_UA",
) -> ingest_pb2.DataGap:
    record = ingest_pb2.DataGap(
        well_id=well, parameter_name=parameter, point_count=count, reason=reason, source=source
    )
    record.first_timestamp.FromDatetime(BASE + timedelta(seconds=first_s))
    record.last_timestamp.FromDatetime(BASE + timedelta(seconds=last_s))
    return record


def batch(
    sequence: int, gaps: list[ingest_pb2.DataGap], points: int = 0, agent: str = "agent-g"
) -> ingest_pb2.IngestRequest:
    return ingest_pb2.IngestRequest(
        agent_id=agent,
        batch_sequence=sequence,
        data_points=[point(sequence * 1000 + i) for i in range(points)],
        data_gaps=gaps,
    )


async def gap_rows(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        f'SELECT * FROM "{tenant}_streams".data_gaps ORDER BY id'
    )
    return rows


async def test_gaps_are_stored_with_their_batch_exactly(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    sent = [
        gap(0, 59, 60, "size_cap"),
        gap(-86_400, -3_600, 82_800, "retention", parameter="hookload", source=""),
        gap(5, 5, 1, "dead_letter", well="WELL_002", source="PI_WEB_API"),
    ]
    sent[2].last_timestamp.nanos = sent[2].first_timestamp.nanos = 123_456_789
    response = await stub.Ingest(
        stream_of([batch(4, sent, points=2)]), metadata=auth(make_token(tenant))
    )
    [result] = response.batches
    assert (result.accepted_count, result.gap_count, result.duplicate_batch) == (2, 3, False)
    assert await stored_count(db, tenant) == 2

    rows = await gap_rows(db, tenant)
    assert [
        (
            r["tenant_id"],
            r["agent_id"],
            r["batch_sequence"],
            r["ingestion_id"],
            r["gap_index"],
            r["well_id"],
            r["parameter_name"],
            r["first_timestamp"],
            r["last_timestamp"],
            r["point_count"],
            r["reason"],
        )
        for r in rows
    ] == [
        (
            tenant,
            "agent-g",
            4,
            result.ingestion_id,
            0,
            "WELL_001",
            "wellhead_pressure",
            BASE,
            BASE + timedelta(seconds=59),
            60,
            "size_cap",
        ),
        (
            tenant,
            "agent-g",
            4,
            result.ingestion_id,
            1,
            "WELL_001",
            "hookload",
            BASE - timedelta(days=1),
            BASE - timedelta(hours=1),
            82_800,
            "retention",
        ),
        (
            tenant,
            "agent-g",
            4,
            result.ingestion_id,
            2,
            "WELL_002",
            "wellhead_pressure",
            BASE + timedelta(seconds=5, microseconds=123_456),
            BASE + timedelta(seconds=5, microseconds=123_456),
            1,
            "dead_letter",
        ),
    ]
    # The source is sealed like a stored point's: ciphertext in SQL, the sent text read back.
    assert all(
        b"SCADA" not in r["sealed_source"] and b"PI_WEB" not in r["sealed_source"] for r in rows
    )
    read = [g async for g in gateway.storage.read_gaps(tenant)]
    assert [(g.well_id, g.reason, g.source) for g in read] == [
        ("WELL_001", "size_cap", "SCADA_OPC_UA"),  # newest first, by the last lost point
        ("WELL_002", "dead_letter", "PI_WEB_API"),
        ("WELL_001", "retention", ""),
    ]

    ledger = await db.fetchrow(
        f'SELECT accepted_count, gap_count FROM "{tenant}_streams".batch_ledger'
        " WHERE agent_id = 'agent-g' AND batch_sequence = 4"
    )
    assert tuple(ledger) == (2, 3)
    await gateway.audit.flush()
    audited = await db.fetchval(
        "SELECT gap_count FROM system_monitoring.audit_log WHERE ingestion_id = $1",
        result.ingestion_id,
    )
    assert audited == 3
    assert (
        gateway.metrics.registry.get_sample_value(
            "welltegra_gateway_data_gaps_total", {"tenant": tenant}
        )
        == 3
    )


async def test_a_batch_of_gaps_only_is_accepted(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    response = await stub.Ingest(
        stream_of([batch(1, [gap(reason="retention")])]), metadata=auth(make_token(tenant))
    )
    [result] = response.batches
    assert (result.accepted_count, result.rejected_count, result.gap_count) == (0, 0, 1)
    assert await stored_count(db, tenant) == 0
    assert [(r["reason"], r["point_count"]) for r in await gap_rows(db, tenant)] == [
        ("retention", 60)
    ]
    assert await db.fetchval(f'SELECT gap_count FROM "{tenant}_streams".batch_ledger') == 1


async def test_a_resent_batch_never_records_its_gaps_twice(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    token = make_token(tenant)
    sealed = batch(9, [gap(), gap(100, 200, 5, "dead_letter")], points=1)
    first = await stub.Ingest(stream_of([sealed]), metadata=auth(token))
    assert first.batches[0].gap_count == 2
    # Resent as it was (its acknowledgement was lost), then from the backlog lane.
    again = await stub.Ingest(stream_of([sealed]), metadata=auth(token))
    replayed = await ingest_raw(gateway, token, sealed.SerializeToString() + HISTORICAL_SUFFIX)
    for response in (again, replayed):
        [result] = response.batches
        assert result.duplicate_batch
        assert (result.gap_count, result.duplicate_count) == (0, 1)
    assert len(await gap_rows(db, tenant)) == 2
    # The same gaps under a new sequence number are a new batch: recorded as sent.
    renumbered = batch(10, list(sealed.data_gaps))
    assert (await stub.Ingest(stream_of([renumbered]), metadata=auth(token))).batches[
        0
    ].gap_count == 2
    assert len(await gap_rows(db, tenant)) == 4


def with_mistyped_point_count() -> bytes:
    """An IngestRequest whose only gap has point_count (field 5, an int64) sent as a string."""
    without = gap()
    without.ClearField("point_count")
    record: bytes = without.SerializeToString() + b"\x2a" + _VarintBytes(4) + b"lots"
    head: bytes = ingest_pb2.IngestRequest(agent_id="agent-g", batch_sequence=1).SerializeToString()
    batch_bytes: bytes = head + b"\x32" + _VarintBytes(len(record)) + record  # field 6
    return batch_bytes


def changed(**fields: object) -> list[ingest_pb2.DataGap]:
    record = gap()
    for name, value in fields.items():
        if value is None:
            record.ClearField(name)
        else:
            setattr(record, name, value)
    return [record]


def out_of_range() -> list[ingest_pb2.DataGap]:
    record = gap()
    record.last_timestamp.seconds = 253402300800  # 10000-01-01T00:00:00Z
    return [record]


# (case id, the batch's bytes, expected field violations)
STRUCTURE_CASES: list[tuple[str, Callable[[], bytes], list[tuple[str, str]]]] = [
    (
        "neither points nor gaps",
        lambda: batch(1, []).SerializeToString(),
        [("data_points", "must hold 1 to 1000 points, not 0 unless the batch carries data_gaps")],
    ),
    (
        "1001 gaps",
        lambda: batch(1, [gap()] * 1001).SerializeToString(),
        [("data_gaps", "must hold at most 1000 gaps, not 1001")],
    ),
    (
        "zero point count, third gap",
        lambda: batch(1, [gap(), gap(), gap(count=0)]).SerializeToString(),
        [("data_gaps[2].point_count", "must be 1 or more")],
    ),
    (
        "negative point count",
        lambda: batch(1, changed(point_count=-3)).SerializeToString(),
        [("data_gaps[0].point_count", "must be 1 or more")],
    ),
    (
        "first after last",
        lambda: batch(1, [gap(60, 59)]).SerializeToString(),
        [("data_gaps[0].last_timestamp", "must not be before first_timestamp")],
    ),
    (
        "no first timestamp",
        lambda: batch(1, changed(first_timestamp=None)).SerializeToString(),
        [("data_gaps[0].first_timestamp", "is required")],
    ),
    (
        "year 10000",
        lambda: batch(1, out_of_range()).SerializeToString(),
        [("data_gaps[0].last_timestamp", "must be a valid RFC 3339 time (years 1-9999)")],
    ),
    (
        "unknown reason",
        lambda: batch(1, changed(reason="disk_full")).SerializeToString(),
        [("data_gaps[0].reason", "must be one of dead_letter, retention, size_cap")],
    ),
    (
        "no reason",
        lambda: batch(1, changed(reason="")).SerializeToString(),
        [("data_gaps[0].reason", "is required")],
    ),
    (
        "no well, no parameter",
        lambda: batch(1, changed(well_id="", parameter_name="")).SerializeToString(),
        [
            ("data_gaps[0].well_id", "is required"),
            ("data_gaps[0].parameter_name", "is required"),
        ],
    ),
    (
        "texts too long or with NUL",
        lambda: batch(
            1, changed(well_id="W" * 129, parameter_name="p\x00", source="s" * 257)
        ).SerializeToString(),
        [
            ("data_gaps[0].well_id", "must be at most 128 characters"),
            ("data_gaps[0].parameter_name", "must not contain NUL characters"),
            ("data_gaps[0].source", "must be at most 256 characters"),
        ],
    ),
    (
        "string for point count",
        with_mistyped_point_count,
        [("data_gaps[0].point_count", "must be a whole number")],
    ),
    (
        "a bad point and a bad gap",
        lambda: ingest_pb2.IngestRequest(
            agent_id="agent-g",
            batch_sequence=1,
            data_points=[point(0), ingest_pb2.DataPoint(well_id="WELL_001")],
            data_gaps=[gap(), gap(count=0)],
        ).SerializeToString(),
        [
            ("data_points[1].parameter_name", "is required"),
            ("data_points[1].unit", "is required"),
            ("data_points[1].value", "is required"),
            ("data_points[1].timestamp", "is required"),
            ("data_gaps[1].point_count", "must be 1 or more"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("raw", "violations"), [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES]
)
async def test_malformed_gaps_refuse_the_batch_field_by_field(
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    raw: Callable[[], bytes],
    violations: list[tuple[str, str]],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ingest_raw(gateway, make_token(tenant), raw())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "Invalid data schema"
    assert rich_status(refused.value) == ("validation_error", violations)
    assert await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".batch_ledger') == 0
    assert await gap_rows(db, tenant) == []
    assert await stored_count(db, tenant) == 0


async def test_realtime_requests_still_need_points(
    stub: ingest_pb2_grpc.IngestServiceStub, tenant: str, make_token: TokenFactory
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IngestRealtime(
            ingest_pb2.IngestRealtimeRequest(), metadata=auth(make_token(tenant))
        )
    assert rich_status(refused.value) == (
        "validation_error",
        [("data_points", "must hold 1 to 1000 points, not 0")],
    )


async def test_one_tenant_cannot_see_or_write_another_tenants_gaps(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    neighbour: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    await stub.Ingest(stream_of([batch(1, [gap()])]), metadata=auth(make_token(neighbour)))
    table = f'"{neighbour}_streams".data_gaps'
    insert = (
        f"INSERT INTO {table} (tenant_id, agent_id, batch_sequence, ingestion_id, gap_index,"
        " well_id, parameter_name, first_timestamp, last_timestamp, point_count, reason,"
        " key_version, sealed_source) VALUES ($1, 'a', 2, 'ing_x', 0, 'W', 'p', $2, $2, 1,"
        " 'size_cap', 1, 'x')"
    )
    async with db.transaction():
        await db.execute(TENANT_FENCE, tenant)  # the gateway working for `tenant`
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0  # the other's: unseen
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await db.execute(insert, neighbour, BASE)
    async with db.transaction():
        await db.execute(TENANT_FENCE, neighbour)  # the gateway working for its owner
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1
    forced = await db.fetchval(
        "SELECT relforcerowsecurity FROM pg_class WHERE oid = $1::regclass", table
    )
    assert forced


async def test_existing_tenants_get_the_gaps_table_at_the_next_start(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    schema = f'"{tenant}_streams"'
    # A tenant as the previous release made it: no data_gaps, no gap_count in its ledger.
    await db.execute(f"DROP TABLE {schema}.data_gaps")
    await db.execute(f"ALTER TABLE {schema}.batch_ledger DROP COLUMN gap_count")
    await db.execute("ALTER TABLE system_monitoring.audit_log DROP COLUMN historical")
    await gateway.storage.migrate()  # what every start runs
    response = await stub.Ingest(
        stream_of([batch(1, [gap()], points=1)]), metadata=auth(make_token(tenant))
    )
    assert response.batches[0].gap_count == 1
    assert len(await gap_rows(db, tenant)) == 1
    policies = await db.fetch(
        "SELECT policyname FROM pg_policies WHERE schemaname = $1 AND tablename = 'data_gaps'",
        f"{tenant}_streams",
    )
    assert [p[0] for p in policies] == ["tenant_only"]
    await gateway.audit.flush()
    assert (
        await db.fetchval(
            "SELECT historical FROM system_monitoring.audit_log WHERE ingestion_id = $1",
            response.batches[0].ingestion_id,
        )
        is False
    )


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The CLI in a subprocess, without blocking the event loop (the gateway runs on it)."""
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


async def test_the_gaps_command_lists_a_tenants_gaps(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    make_token: TokenFactory,
    database_url: str,
    redis_url: str,
    master_key: str,
    tmp_path: Path,
) -> None:
    token = make_token(tenant)
    first = await stub.Ingest(
        stream_of([batch(1, [gap(0, 59, 60), gap(0, 9, 10, "retention", well="WELL_002")])]),
        metadata=auth(token),
    )
    second = await stub.Ingest(
        stream_of([batch(2, [gap(600, 659, 60, "dead_letter", source="")])]),
        metadata=auth(token),
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "WELLTEGRA_MASTER_KEY": master_key,
    }
    common = ("--tenant", tenant, "--data-dir", str(tmp_path))

    code, out, err = await run_cli("gaps", *common, "--json", env=env)
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert listed[0] == {
        "well_id": "WELL_001",
        "parameter_name": "wellhead_pressure",
        "first_timestamp": "2025-11-06T14:40:00+00:00",
        "last_timestamp": "2025-11-06T14:40:59+00:00",
        "point_count": 60,
        "reason": "dead_letter",
        "source": "",
        "agent_id": "agent-g",
        "batch_sequence": 2,
        "ingestion_id": second.batches[0].ingestion_id,
        "received_at": listed[0]["received_at"],
    }
    assert datetime.fromisoformat(listed[0]["received_at"]) <= datetime.now(UTC)
    assert [(g["well_id"], g["reason"], g["ingestion_id"]) for g in listed[1:]] == [
        ("WELL_001", "size_cap", first.batches[0].ingestion_id),
        ("WELL_002", "retention", first.batches[0].ingestion_id),
    ]
    assert listed[1]["source"] == "SCADA_OPC_UA"

    code, out, err = await run_cli(
        "gaps", *common, "--well", "WELL_001", "--since", "2025-11-06T14:35:00Z", env=env
    )
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split(",")[:3] == ["well_id", "parameter_name", "first_timestamp"]
    assert len(lines) == 1 and ",dead_letter," in lines[0]

    code, out, _ = await run_cli("gaps", *common, "--limit", "2", "--format", "json", env=env)
    assert code == 0
    assert [json.loads(line)["reason"] for line in out.splitlines()] == [
        "dead_letter",
        "size_cap",
    ]

    code, _, err = await run_cli("gaps", *common, "--limit", "0", env=env)
    assert code == 2 and "'0' is not a whole number from 1" in err
    code, _, err = await run_cli(
        "gaps", "--tenant", "t_never_made", "--data-dir", str(tmp_path), env=env
    )
    assert code == 2
    assert err.strip() == (
        "welltegra-ingest: error: tenant 't_never_made' is not provisioned on this gateway"
    )


async def test_gaps_at_the_edges_of_time_are_recorded(
    stub: ingest_pb2_grpc.IngestServiceStub,
    gateway: Gateway,
    tenant: str,
    make_token: TokenFactory,
) -> None:
    record = gap(reason="retention")
    record.first_timestamp.FromDatetime(datetime(1, 1, 1, tzinfo=UTC))
    record.last_timestamp.seconds, record.last_timestamp.nanos = 253402300799, 999_999_999
    response = await stub.Ingest(stream_of([batch(1, [record])]), metadata=auth(make_token(tenant)))
    assert response.batches[0].gap_count == 1
    [read] = [g async for g in gateway.storage.read_gaps(tenant)]
    assert (read.first_timestamp, read.last_timestamp) == (
        datetime.min.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=UTC),
    )
