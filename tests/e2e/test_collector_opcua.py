"""OPC UA end to end: an asyncua server (SignAndEncrypt, a user, SQLite history) → the agent's
``opcua`` collector → buffer → uploader → a real gateway process → PostgreSQL, counted point for
point. A known series of values with known source timestamps is written into the server's
variables while the agent runs, while it is stopped (read back from the server's history when it
starts again), and after; every one must be stored, once, with the source's timestamp."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.agent import Agent
from edge.buffer import Buffer
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials

from ..integration.test_collector_opcua import (
    BY_NAME,
    PASSWORD,
    USER,
    OpcUaTestServer,
    make_pki,
)
from .stack import GatewayServer, stored_points, wait_for

pytestmark = pytest.mark.slow

# variable → (parameter, unit given in the config or None for its EngineeringUnits, base value)
TAGS: dict[str, tuple[str, str | None, float]] = {
    "WHP_WELL_001": ("wellhead_pressure", "psi", 2_000.0),
    "HL_WELL_001": ("hookload", "klbs", 250.0),
    "FLOW_WELL_001": ("flow_rate", "bbl/day", 1_200.0),
    "TEMP_WELL_001": ("downhole_temperature", None, 200.0),  # EngineeringUnits: °F
}
WELL = "WELL-007"

Identity = tuple[str, str, datetime]


def _config(
    path: Path,
    gateway: GatewayServer,
    tenant: str,
    client: ClientCredentials,
    opcua: OpcUaTestServer,
) -> Path:
    tags: list[dict[str, Any]] = []
    for name, (parameter, unit, _) in TAGS.items():
        entry: dict[str, Any] = {
            "node_id": BY_NAME[name].node_id,
            "well_id": WELL,
            "parameter": parameter,
        }
        if unit is not None:
            entry["unit"] = unit
        tags.append(entry)
    config = {
        "tenant": {"id": tenant},
        "api": {"grpc_target": gateway.target, "tls": {"enabled": False}, "live_window": "2s"},
        "oauth": {
            "token_url": gateway.token_url,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
        "data_sources": [
            {
                "name": "scada",
                "type": "opcua",
                "connection": {
                    "endpoint": opcua.endpoint,
                    "security_mode": "SignAndEncrypt",
                    "security_policy": "Basic256Sha256",
                    "username": USER,
                    "password": PASSWORD,
                    "certificate_dir": str(path.parent / "pki"),
                    "server_certificate": str(opcua.pki.certificate),
                },
                "publishing_interval": "50ms",
                "tags": tags,
            }
        ],
        "buffer": {"database_path": str(path.parent / "buffer.db")},
        "retry": {"initial_delay": "200ms", "max_delay": "1s"},
        "logging": {"file": str(path.parent / "agent.log")},
        "monitoring": {"health_check_port": 0, "prometheus_metrics_port": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def _write_series(
    opcua: OpcUaTestServer, start: datetime, count: int, offset: float
) -> set[Identity]:
    """``count`` values per tag, 10 ms apart from ``start``; their identities."""
    written: set[Identity] = set()
    for i in range(count):
        at = start + timedelta(milliseconds=10 * i)
        for name, (parameter, _, base) in TAGS.items():
            await opcua.write(name, base + offset + i * 0.25, at)
            written.add((WELL, parameter, at))
    return written


async def _watermarks(agent: Agent, at: datetime) -> bool:
    assert agent.buffer is not None
    for name in TAGS:
        if await agent.buffer.watermark("scada", BY_NAME[name].node_id) != at.isoformat():
            return False
    return True


async def _drain(agent: Agent) -> None:
    await agent.stop_collecting()

    async def drained() -> bool:
        assert agent.buffer is not None
        return (await agent.buffer.stats()).pending_batches == 0

    await wait_for(drained, timeout=60)


async def test_opcua_to_postgres_point_for_point_across_an_agent_restart(
    tmp_path: Path,
    server: GatewayServer,
    tenant: str,
    client: ClientCredentials,
    database_url: str,
) -> None:
    opcua = OpcUaTestServer(tmp_path / "opcua", make_pki(tmp_path / "opcua-pki"))
    await opcua.start()
    try:
        config = _config(tmp_path / "agent.yaml", server, tenant, client, opcua)
        now = datetime.now(UTC)
        # Half a millisecond past a millisecond: no value of the series falls on a whole
        # second, which the test server's SQLite history (asyncua's) stores as text without a
        # fraction and then cannot read back (sqlite3's timestamp converter).
        t0 = now.replace(microsecond=now.microsecond // 1000 * 1000 + 500) + timedelta(seconds=1)
        expected: set[Identity] = set()

        # 1. Live: the agent subscribes; a first value per tag shows it has.
        agent = Agent(load_agent_config(config), serve_endpoints=False)
        await agent.start()
        try:
            expected |= await _write_series(opcua, t0, 1, 0.0)
            await wait_for(lambda: _watermarks(agent, t0), timeout=30, interval=0.05)
            live = t0 + timedelta(seconds=1)
            expected |= await _write_series(opcua, live, 40, 1.0)
            await wait_for(
                lambda: _watermarks(agent, live + timedelta(milliseconds=390)),
                timeout=30,
                interval=0.05,
            )
        finally:
            await agent.stop()

        # 2. The agent is down: the server keeps history.
        down = t0 + timedelta(seconds=2)
        expected |= await _write_series(opcua, down, 40, 2.0)
        await opcua.historized("TEMP_WELL_001", down + timedelta(milliseconds=390))

        # 3. Started again: the gap is read from history, then live values follow.
        agent = Agent(load_agent_config(config), serve_endpoints=False)
        await agent.start()
        try:
            await wait_for(
                lambda: _watermarks(agent, down + timedelta(milliseconds=390)),
                timeout=30,
                interval=0.05,
            )
            after = t0 + timedelta(seconds=3)
            expected |= await _write_series(opcua, after, 20, 3.0)
            await wait_for(
                lambda: _watermarks(agent, after + timedelta(milliseconds=190)),
                timeout=30,
                interval=0.05,
            )
            await asyncio.sleep(0.3)  # anything extra would be sent by now
            await _drain(agent)
        finally:
            await agent.stop()
    finally:
        await opcua.stop()

    stored = await stored_points(database_url, tenant)
    assert len(expected) == 4 * (1 + 40 + 40 + 20)
    # Every value written is stored, once; nothing else is (the servers' initial statuses
    # without a value are dropped by the agent's transform).
    assert len(stored) == len(set(stored))
    assert set(stored) == expected

    # The agent's watermark for each tag is the last value it stored.
    buffer = await Buffer.open(tmp_path / "buffer.db", tenant_id=tenant)
    try:
        last = (t0 + timedelta(seconds=3, milliseconds=190)).isoformat()
        for name in TAGS:
            assert await buffer.watermark("scada", BY_NAME[name].node_id) == last
    finally:
        await buffer.close()
