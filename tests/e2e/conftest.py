"""End-to-end fixtures: a gateway process with its development issuer on the session's
PostgreSQL and Redis, a provisioned tenant and an OAuth client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest_service.dev_issuer import ClientCredentials, create_client
from ingest_service.server import Gateway

from .stack import GatewayServer


@pytest.fixture
async def server(
    tmp_path: Path, database_url: str, redis_url: str, master_key: str
) -> AsyncIterator[GatewayServer]:
    """A gateway process; tests may stop, kill and restart it."""
    gateway = GatewayServer(tmp_path / "gateway", database_url, redis_url, master_key)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.fixture
async def client(gateway: Gateway, tenant: str) -> ClientCredentials:
    """An OAuth client of the test's tenant (removed with the tenant)."""
    return await create_client(gateway.storage.pool, tenant)
