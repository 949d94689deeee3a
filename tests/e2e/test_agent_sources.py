"""One failing source never stops the others: a Modbus device that is not there is restarted
with backoff, while the simulated wells beside it are stored point for point."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials

from .stack import (
    GatewayServer,
    agent_config,
    assert_contiguous,
    free_port,
    stored_points,
    wait_for,
)

pytestmark = pytest.mark.slow


async def test_a_failing_source_does_not_stop_the_others(
    tmp_path: Path,
    server: GatewayServer,
    tenant: str,
    client: ClientCredentials,
    database_url: str,
) -> None:
    path = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret, rate=20
    )
    data = yaml.safe_load(path.read_text())
    data["data_sources"].append(
        {
            "name": "absent_plc",
            "type": "modbus",
            "host": "127.0.0.1",
            "port": free_port(),  # nothing listens here
            "well_id": "WELL-001",
            "registers": [
                {"address": 0, "data_type": "uint16", "parameter": "hookload", "unit": "klbs"}
            ],
        }
    )
    path.write_text(yaml.safe_dump(data))
    config = load_agent_config(path)
    agent = Agent(config, serve_endpoints=False)
    await agent.start()
    restarts = "ingestion_collector_restarts_total"
    try:
        await wait_for(lambda: _at_least(agent, restarts, 2, source="absent_plc"), timeout=60)
        # ... while the simulator beside it goes on: several ticks of its 12 tags are buffered.
        collected = "ingestion_data_points_collected_total"
        await wait_for(
            lambda: _at_least(agent, collected, 60, source="sim", tenant_id=tenant), timeout=60
        )
        await agent.stop_collecting()
        assert agent.buffer is not None
        buffer = agent.buffer

        async def drained() -> bool:
            return (await buffer.stats()).pending_batches == 0

        await wait_for(drained)
    finally:
        await agent.stop()
    assert agent.metrics.value("ingestion_collector_up", source="absent_plc") == 0
    simulator = config.data_sources[0]
    first, last = assert_contiguous(await stored_points(database_url, tenant), simulator)  # type: ignore[arg-type]
    assert last > first


async def _at_least(agent: Agent, name: str, count: float, **labels: str) -> bool:
    await asyncio.sleep(0)
    return agent.metrics.value(name, **labels) >= count
