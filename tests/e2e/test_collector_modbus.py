"""The ``modbus`` collector end to end: a pymodbus TCP server → the agent → a gateway process →
PostgreSQL, counted point for point.

The device counts every read it answers; a counter register goes up by one on each read of its
block, so its stored values must be exactly 1..N for N answered reads. Each register's stored
timestamps must fall one per slot of its poll interval's grid."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials
from ingest_service.server import Gateway
from tests.integration.test_collector_modbus import ModbusDevice

from .stack import GatewayServer, agent_config, wait_for

pytestmark = pytest.mark.slow

FAST, SLOW = 0.5, 1.0


def modbus_agent_config(
    path: Path, server: GatewayServer, tenant: str, client: ClientCredentials, port: int
) -> Path:
    agent_config(path, server, tenant, client.client_id, client.client_secret)
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["data_sources"] = [
        {
            "name": "plc",
            "type": "modbus",
            "host": "127.0.0.1",
            "port": port,
            "timeout": "1s",
            "well_id": "WELL-001",
            "poll_interval": f"{SLOW}s",
            "registers": [
                # Block A, every FAST seconds: a counter and a float32 in bar.
                {"address": 0, "data_type": "uint16", "parameter": "hookload", "unit": "klbs",
                 "poll_interval": f"{FAST}s", "tag": "HL"},
                {"address": 1, "data_type": "float32", "parameter": "wellhead_pressure",
                 "unit": "bar", "poll_interval": f"{FAST}s", "tag": "PT"},
                # Block B, every SLOW seconds: a counter scaled, on another well.
                {"address": 10, "data_type": "uint16", "parameter": "flow_rate",
                 "unit": "bbl/day", "scale": 10, "well_id": "WELL-002", "tag": "FT"},
                # Block C, every SLOW seconds: an input register, int16 below zero.
                {"address": 5, "table": "input", "data_type": "int16",
                 "parameter": "downhole_temperature", "unit": "degC", "tag": "TT"},
            ],
        }
    ]
    path.write_text(yaml.safe_dump(config))
    return path


async def drained(agent: Agent) -> bool:
    assert agent.buffer is not None
    return (await agent.buffer.stats()).pending_batches == 0


async def test_modbus_device_to_postgres_point_for_point(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    gateway: Gateway,
) -> None:
    pressure = [int.from_bytes(struct.pack(">f", 100.0)[i : i + 2], "big") for i in (0, 2)]
    device = ModbusDevice(
        {0: 0, 1: pressure[0], 2: pressure[1], 10: 0}, inputs={5: (-40) & 0xFFFF},
        counters=[0, 10],
    )
    await device.start()
    config = modbus_agent_config(tmp_path / "agent.yaml", server, tenant, client, device.port)
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    block_a, block_b, block_c = (3, 0, 3), (3, 10, 1), (4, 5, 1)
    try:
        await agent.start()
        await wait_for(_answered(device, block_b, 5), timeout=60, interval=0.05)
        # From here the device refuses every read; once each block has been refused, every
        # answered read is in the buffer (a poll is emitted before the next one starts).
        device.refuse = True
        for block in (block_a, block_b, block_c):
            await wait_for(_refused(device, block), timeout=30, interval=0.05)
        await agent.stop_collecting()
        await wait_for(lambda: drained(agent), timeout=60)
    finally:
        await agent.stop()
        await device.stop()

    stored = [p async for p in gateway.storage.read_points(tenant)]
    by_series: dict[tuple[str, str], list[Any]] = {}
    for point in stored:
        by_series.setdefault((point.well_id, point.parameter_name), []).append(point)
    answered = {block: device.answered[block] for block in (block_a, block_b, block_c)}
    assert {series: len(points) for series, points in by_series.items()} == {
        ("WELL-001", "hookload"): answered[block_a],
        ("WELL-001", "wellhead_pressure"): answered[block_a],
        ("WELL-002", "flow_rate"): answered[block_b],
        ("WELL-001", "downhole_temperature"): answered[block_c],
    }
    # Point for point: the counters read 1, 2, ... N, in time order.
    hookload = by_series["WELL-001", "hookload"]
    assert [p.value for p in hookload] == [float(i) for i in range(1, answered[block_a] + 1)]
    flow = by_series["WELL-002", "flow_rate"]
    assert [p.value for p in flow] == [10.0 * i for i in range(1, answered[block_b] + 1)]
    # Converted to canonical units by the agent: 100 bar, -40 degC.
    assert {round(p.value, 3) for p in by_series["WELL-001", "wellhead_pressure"]} == {1450.377}
    assert {p.unit for p in by_series["WELL-001", "wellhead_pressure"]} == {"psi"}
    assert {round(p.value, 6) for p in by_series["WELL-001", "downhole_temperature"]} == {-40.0}
    assert {p.quality_code for p in stored} == {"GOOD"}
    assert {p.source for p in hookload} == {"plc:HL"}
    # The poll grid: one read per slot of each register's interval; the same instants for the
    # registers of one block; block A read about twice as often as block B.
    for series, interval in (
        (("WELL-001", "hookload"), FAST), (("WELL-002", "flow_rate"), SLOW),
        (("WELL-001", "downhole_temperature"), SLOW),
    ):
        slots = [math.floor(p.timestamp.timestamp() / interval) for p in by_series[series]]
        assert len(set(slots)) == len(slots), f"{series}: two reads in one {interval}s slot"
    assert [p.timestamp for p in hookload] == [
        p.timestamp for p in by_series["WELL-001", "wellhead_pressure"]
    ]
    assert 1.5 <= answered[block_a] / answered[block_b] <= 2.5


def _answered(device: ModbusDevice, block: tuple[int, int, int], count: int) -> Any:
    async def check() -> bool:
        return device.answered[block] >= count

    return check


def _refused(device: ModbusDevice, block: tuple[int, int, int]) -> Any:
    async def check() -> bool:
        return device.refused[block] >= 1

    return check

