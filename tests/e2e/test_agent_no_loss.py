"""The agent's promises end to end, against a real gateway process on real PostgreSQL and Redis:
every simulated point is stored exactly once through gateway outages, ``kill -9`` of either
side, token refreshes, a refused batch, and a full buffer (whose losses are reported, exactly).

The simulator is deterministic, so what should be stored is known point for point: each tag
must hold every tick from its first stored one to the last, once."""

from __future__ import annotations

import asyncio
import math
import random
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from edge.agent import Agent
from edge.buffer import Buffer
from edge.collectors.simulator import Simulator
from edge.config import load_agent_config
from edge.readings import Point
from ingest_service.dev_issuer import ClientCredentials

from .stack import (
    GatewayServer,
    agent_config,
    assert_contiguous,
    expected_points,
    run_agent,
    stop_agent,
    stored_gaps,
    stored_points,
    utc,
    wait_for,
)

pytestmark = pytest.mark.slow


async def drained(agent: Agent) -> bool:
    assert agent.buffer is not None
    stats = await agent.buffer.stats()
    return stats.pending_batches == 0


async def drain(agent: Agent, timeout: float = 60) -> None:
    """Stop collecting and wait until the gateway has acknowledged everything."""
    await agent.stop_collecting()
    await wait_for(lambda: drained(agent), timeout=timeout)


async def finish(config: Path) -> Agent:
    """Run an agent on ``config`` until its buffer is empty, then stop it."""
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await asyncio.sleep(0.5)
        await drain(agent, timeout=120)
    finally:
        await agent.stop()
    return agent


async def test_gateway_outage_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str,
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret, rate=20
    )
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await asyncio.sleep(2)
        await server.stop()
        await asyncio.sleep(3)  # the agent keeps collecting into its buffer
        assert agent.buffer is not None
        assert (await agent.buffer.stats()).pending_points > 0
        await server.start()
        await asyncio.sleep(1)
        await drain(agent)
    finally:
        await agent.stop()
    simulator = load_agent_config(config).data_sources[0]
    points = await stored_points(database_url, tenant)
    first, last = assert_contiguous(points, simulator)  # type: ignore[arg-type]
    # Collection ran for the whole 6 s, outage included.
    assert (last - first) / simulator.rate >= 5  # type: ignore[union-attr]


async def test_kill_9_of_the_agent_and_of_the_gateway_loses_nothing(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str,
) -> None:
    # Heavy collection: 3 wells × 4 parameters at 200 Hz = 2,400 points/s.
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret,
        rate=200,
    )
    randomly = random.Random(5)
    for round_ in range(3):
        process = await run_agent(config)
        await asyncio.sleep(1.0 + randomly.random())
        if round_ == 1:
            await server.stop(signal.SIGKILL)  # the gateway dies mid-stream
            await server.start()
            await asyncio.sleep(0.5 + randomly.random())
        await stop_agent(process, signal.SIGKILL)
    await server.stop(signal.SIGKILL)
    await server.start()
    await finish(config)
    simulator = load_agent_config(config).data_sources[0]
    points = await stored_points(database_url, tenant)
    _, last = assert_contiguous(points, simulator)  # type: ignore[arg-type]
    buffer = await Buffer.open(tmp_path / "buffer.db", tenant_id=tenant)
    try:
        # The last stored tick is the simulator's watermark: nothing read was left behind.
        assert await buffer.watermark("sim", "tick") == str(last)
    finally:
        await buffer.close()


async def test_token_refresh_while_streaming_and_a_wrong_secret_keeps_data(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = agent_config(
        tmp_path / "wrong.yaml", server, tenant, client.client_id, "not-the-secret", rate=20
    )
    agent = Agent(load_agent_config(wrong), serve_endpoints=False)
    await agent.start()
    try:
        await asyncio.sleep(2)
        assert agent.buffer is not None
        assert (await agent.buffer.stats()).pending_points > 0
        assert agent.metrics.value("ingestion_upload_errors_total", code="token") >= 1
    finally:
        await agent.stop()
    assert await stored_points(database_url, tenant) == []
    assert "invalid_client" in caplog.text and "not-the-secret" not in caplog.text

    # The right secret, and tokens of 10 s (the issuer's shortest), which the agent renews
    # half-way through their life (the margin is capped there) while it streams.
    await server.stop()
    server.token_lifetime = "10s"
    await server.start()
    right = agent_config(
        tmp_path / "right.yaml", server, tenant, client.client_id, client.client_secret,
        rate=20,
    )
    agent = Agent(load_agent_config(right), serve_endpoints=False)
    await agent.start()
    try:
        await asyncio.sleep(12)
        await drain(agent)
    finally:
        await agent.stop()
    assert agent.metrics.value("ingestion_token_refreshes_total") >= 3
    simulator = load_agent_config(right).data_sources[0]
    assert_contiguous(await stored_points(database_url, tenant), simulator)  # type: ignore[arg-type]


async def test_a_refused_batch_is_dead_lettered_and_later_batches_flow(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str,
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret, rate=5
    )
    # A batch the gateway must refuse: a point whose value is not a number.
    buffer = await Buffer.open(tmp_path / "buffer.db", tenant_id=tenant)
    poison = Point("WELL-001", "hookload", 1_767_225_600, 0, math.nan, "klbs", "GOOD", "manual")
    await buffer.append("manual", [poison])
    await buffer.close()
    agent = await finish(config)
    assert agent.metrics.value("ingestion_data_points_dead_lettered_total", tenant_id=tenant) == 1
    buffer = await Buffer.open(tmp_path / "buffer.db", tenant_id=tenant)
    try:
        stats = await buffer.stats()
        assert (stats.dead_letter_batches, stats.dead_letter_points) == (1, 1)
    finally:
        await buffer.close()
    simulator = load_agent_config(config).data_sources[0]
    assert_contiguous(await stored_points(database_url, tenant), simulator)  # type: ignore[arg-type]
    [gap] = await stored_gaps(database_url, tenant)
    assert (gap["reason"], gap["point_count"], gap["well_id"]) == ("dead_letter", 1, "WELL-001")


async def test_a_full_buffer_drops_the_oldest_and_reports_exactly_what_was_lost(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str,
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret,
        rate=500, buffer={"max_size_gb": 512 * 1024 / 1024**3},
    )
    await server.stop()
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        assert agent.buffer is not None
        await wait_for(lambda: _dropped(agent), timeout=60)
        await asyncio.sleep(1)
        await server.start()
        await drain(agent)
    finally:
        await agent.stop()
    assert agent.buffer is not None
    dropped = agent.buffer.dropped["size_cap"]
    assert agent.metrics.value(
        "ingestion_data_points_dropped_total", tenant_id=tenant, reason="size_cap"
    ) == dropped
    simulator = load_agent_config(config).data_sources[0]
    stored = set(await stored_points(database_url, tenant))
    buffer = await Buffer.open(tmp_path / "buffer.db", tenant_id=tenant)
    try:
        last = int(await buffer.watermark("sim", "tick") or 0)
    finally:
        await buffer.close()
    source = Simulator(simulator)  # type: ignore[arg-type]
    first = min(source.tick_of(ts) for _, _, ts in stored)
    gaps = await stored_gaps(database_url, tenant)
    # Before the first stored point, everything the simulator produced was lost and reported.
    lost_from = min(g["first_timestamp"] for g in gaps)
    produced = expected_points(simulator, lost_from, source.tick_time(last))  # type: ignore[arg-type]
    missing = produced - stored
    assert sum(g["point_count"] for g in gaps) == len(missing) == dropped
    for gap in gaps:
        assert gap["reason"] == "size_cap"
        inside = {
            p for p in missing
            if (p[0], p[1]) == (gap["well_id"], gap["parameter_name"])
            and gap["first_timestamp"] <= p[2] <= gap["last_timestamp"]
        }
        assert len(inside) == gap["point_count"]
    assert first > source.tick_of(lost_from)


async def _dropped(agent: Agent) -> bool:
    assert agent.buffer is not None
    return agent.buffer.dropped["size_cap"] > 0


async def test_live_points_overtake_the_backlog_and_the_cache_keeps_the_newest(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str, redis_url: str,
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret,
        rate=400, api={"max_batches_per_call": 8, "backlog_share": 0.3, "live_window": "1s"},
    )
    await server.stop()
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        assert agent.buffer is not None
        await wait_for(lambda: _pending_points(agent, 30_000), timeout=60)
        await server.start()
        reconnected = asyncio.get_running_loop().time()
        await asyncio.sleep(3)  # live data flows while the backlog drains
        await drain(agent, timeout=120)
        drain_seconds = asyncio.get_running_loop().time() - reconnected
    finally:
        await agent.stop()
    assert drain_seconds > 0
    conn = await __import__("asyncpg").connect(database_url)
    try:
        # For the rows stored after the gateway came back: when was each point read, when was
        # it stored? Live points (read after the reconnection) were stored within seconds,
        # while the backlog was still draining.
        rows = await conn.fetch(
            f'SELECT ts, ingested_at FROM "{tenant}_streams".real_time_parameters'
        )
    finally:
        await conn.close()
    reconnect_at = min(r["ingested_at"] for r in rows)
    backlog_done = max(r["ingested_at"] for r in rows if r["ts"] < reconnect_at)
    live = [r for r in rows if r["ts"] > reconnect_at]
    assert live
    first_live_stored = min(r["ingested_at"] for r in live)
    assert first_live_stored < backlog_done, "live data waited behind the backlog"
    # The latest-value cache holds each tag's newest point, never a replayed older one.
    newest = max(r["ts"] for r in rows)
    client_redis = aioredis.from_url(redis_url)
    try:
        cached = await client_redis.hget(f"realtime:{{{tenant}}}:WELL-001:hookload", "ts_us")
    finally:
        await client_redis.aclose()
    assert cached is not None
    assert abs(int(cached) / 1e6 - newest.timestamp()) < 1.0


async def _pending_points(agent: Agent, at_least: int) -> bool:
    assert agent.buffer is not None
    return (await agent.buffer.stats()).pending_points >= at_least


def test_expected_points_follow_the_simulator_grid() -> None:
    from edge.collectors.simulator import SimulatorConfig

    simulator = SimulatorConfig(name="sim", wells=("W",), parameters=("hookload",), rate=2)
    points = expected_points(simulator, utc(100), utc(102))
    assert sorted(p[2] for p in points) == [utc(100 + i / 2) for i in range(5)]
