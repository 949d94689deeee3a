"""Row-level security, the second fence: as the gateway's writer role, a transaction set for
tenant A can neither see nor write tenant B's rows, even in B's own tables, and the role has
no way around the policies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from ingest_service.server import Gateway
from ingest_service.storage import TENANT_FENCE, WRITER_ROLE
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import TokenFactory
from .test_ingest import auth, point


@pytest.fixture
async def other_tenant(gateway: Gateway) -> AsyncIterator[str]:
    name = "rls_other_tenant"
    await gateway.storage.create_tenant(name)
    yield name
    await gateway.storage.drop_tenant(name)


async def test_the_writer_role_cannot_bypass_row_security(
    gateway: Gateway, db: asyncpg.Connection
) -> None:
    # gateway: its start applied the migrations that create the role.
    role = await db.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = $1", WRITER_ROLE
    )
    assert tuple(role) == (False, False, False)


async def test_a_transaction_for_one_tenant_cannot_touch_another(
    stub: ingest_pb2_grpc.IngestServiceStub,
    tenant: str,
    other_tenant: str,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    await stub.IngestRealtime(
        ingest_pb2.IngestRealtimeRequest(data_points=[point(0)]),
        metadata=auth(make_token(other_tenant)),
    )
    table = f'"{other_tenant}_streams".real_time_parameters'
    row = (
        other_tenant,
        "W",
        "wellhead_pressure",
        datetime(2025, 11, 6, tzinfo=UTC),
        "psi",
        1,
        b"x",
        "ing_x",
    )
    insert = (
        f"INSERT INTO {table} (tenant_id, well_id, parameter_name, ts, unit, key_version,"
        " sealed, ingestion_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    )
    for_tenant = TENANT_FENCE  # exactly what the gateway runs first in a batch
    async with db.transaction():
        await db.execute(for_tenant, tenant)  # the gateway working for `tenant`
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0  # the other's rows: unseen
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await db.execute(insert, *row)  # and not writable
    async with db.transaction():
        await db.execute(for_tenant, other_tenant)  # the gateway working for its owner
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1
    async with db.transaction():
        await db.execute(for_tenant, other_tenant)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("SET LOCAL row_security = off")
            await db.fetchval(f"SELECT count(*) FROM {table}")
