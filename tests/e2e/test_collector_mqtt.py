"""The ``mqtt`` collector end to end: this machine's Mosquitto → the agent → a gateway process
→ PostgreSQL, counted point for point, JSON and Sparkplug B, with the agent stopped for a while
in the middle: what was published meanwhile is kept by the broker for the agent's persistent
session and arrives after the restart, stored once."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from edge.agent import Agent
from edge.collectors.mqtt import Mqtt, MqttConfig
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials
from ingest_service.server import Gateway
from tests.integration.test_collector_mqtt import (
    BROKER,
    DOUBLE,
    UINT64,
    RecordingSink,
    broker_up,
    payload,
)

from .stack import GatewayServer, agent_config, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not broker_up(), reason="no MQTT broker on 127.0.0.1:1883"),
]

START = datetime(2026, 3, 1, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def mqtt_agent_config(
    path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    prefix: str, group: str, client_id: str,
) -> Path:
    agent_config(path, server, tenant, client.client_id, client.client_secret)
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["data_sources"] = [
        {
            "name": "broker",
            "type": "mqtt",
            "host": BROKER[0],
            "port": BROKER[1],
            "client_id": client_id,
            "topics": [
                {
                    "topic": f"{prefix}/+/wellhead",
                    "well_id_topic_level": 2,
                    "timestamp_field": "ts",
                    "values": [
                        {"field": "p", "parameter": "wellhead_pressure", "unit": "bar"},
                        {"field": "hl", "parameter": "hookload", "unit": "klbs"},
                    ],
                }
            ],
            "sparkplug": [
                {
                    "group_id": group,
                    "well_id_from": "device",
                    "metrics": [
                        {"name": "Flow", "parameter": "flow_rate", "unit": "bbl/day"},
                    ],
                }
            ],
        }
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def json_message(well: str, i: int) -> tuple[str, bytes]:
    instant = (START + timedelta(seconds=i)).isoformat()
    return f"{well}/wellhead", f'{{"ts": "{instant}", "p": {i}, "hl": {100 + i}}}'.encode()


async def drained(agent: Agent) -> bool:
    assert agent.buffer is not None
    return (await agent.buffer.stats()).pending_batches == 0


async def test_mqtt_broker_to_postgres_point_for_point(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    gateway: Gateway,
) -> None:
    prefix = f"wt-e2e/{secrets.token_hex(4)}"
    group = f"G-{secrets.token_hex(4)}"
    client_id = f"wt-agent-{secrets.token_hex(4)}"
    config = mqtt_agent_config(
        tmp_path / "agent.yaml", server, tenant, client, prefix, group, client_id
    )
    source = load_agent_config(config).data_sources[0]
    assert isinstance(source, MqttConfig)
    wells = ["WELL-001", "WELL-002"]
    base = f"spBv1.0/{group}"
    t0 = (START - EPOCH) // timedelta(milliseconds=1)

    def sparkplug(seq: int, value: float, millis: int, kind: str = "DDATA") -> tuple[str, bytes]:
        metric: dict[str, Any] = {"alias": 7, "double_value": value, "timestamp": millis}
        if kind == "DBIRTH":
            metric = {"name": "Flow", "datatype": DOUBLE, **metric}
        return f"{base}/{kind}/rig1/WELL-003", payload(seq, metric)

    try:
        # The session exists before the agent first runs, as on a site where the agent has
        # been installed before: what is published from now on is kept for it.
        primer = Mqtt(source)
        task = asyncio.create_task(primer.run(RecordingSink()))
        await asyncio.wait_for(primer.subscribed.wait(), timeout=10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        async with aiomqtt.Client(*BROKER, identifier=f"wt-pub-{secrets.token_hex(4)}") as pub:

            async def publish(span: range) -> None:
                for i in span:
                    for well in wells:
                        topic, body = json_message(well, i)
                        await pub.publish(f"{prefix}/{topic}", body, qos=1)
                    # Sparkplug data by alias (at QoS 1 here, so the broker keeps it too).
                    topic, body = sparkplug(2 + i, 500.0 + i, t0 + 1000 * (i + 1))
                    await pub.publish(topic, body, qos=1)

            await pub.publish(
                f"{base}/NBIRTH/rig1",
                payload(0, {"name": "bdSeq", "datatype": UINT64, "long_value": 0}), qos=1,
            )
            await pub.publish(*sparkplug(1, 500.0, t0, kind="DBIRTH"), qos=1)
            await publish(range(0, 20))
            await run_agent_until(config, gateway, tenant, 2 * 2 * 20 + 21)
            # The agent is down: these wait at the broker for its session.
            await publish(range(20, 40))
            await run_agent_until(config, gateway, tenant, 2 * 2 * 40 + 41)
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(*BROKER, identifier=client_id, clean_session=True):
                pass

    stored = [p async for p in gateway.storage.read_points(tenant)]
    identities = [(p.well_id, p.parameter_name, p.timestamp) for p in stored]
    assert len(identities) == len(set(identities)), "a point was stored twice"
    expected = {
        (well, "wellhead_pressure", START + timedelta(seconds=i)) for well in wells
        for i in range(40)
    } | {
        (well, "hookload", START + timedelta(seconds=i)) for well in wells for i in range(40)
    } | {
        # Data by alias after the restart too: the node's births were kept in the buffer, and
        # its sequence went on without a gap, so they were trusted without a rebirth.
        ("WELL-003", "flow_rate", START + timedelta(seconds=i)) for i in range(41)
    }
    assert set(identities) == expected
    values = {(p.well_id, p.parameter_name, p.timestamp): p.value for p in stored}
    assert values["WELL-002", "hookload", START + timedelta(seconds=39)] == 139.0
    assert round(values["WELL-001", "wellhead_pressure", START + timedelta(seconds=10)], 3) == (
        145.038
    )
    assert values["WELL-003", "flow_rate", START + timedelta(seconds=40)] == 539.0


async def run_agent_until(config: Path, gateway: Gateway, tenant: str, stored: int) -> Agent:
    """Run an agent until ``stored`` points are in the database and its buffer is empty."""
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await wait_for(lambda: _stored(gateway, tenant, stored), timeout=60)
        await agent.stop_collecting()
        await wait_for(lambda: drained(agent), timeout=60)
    finally:
        await agent.stop()
    return agent


async def _stored(gateway: Gateway, tenant: str, count: int) -> bool:
    return len([p async for p in gateway.storage.read_points(tenant)]) >= count
