"""The ``sql`` collector end to end: daily drilling reports in this machine's MariaDB → the
agent (schedule, watermark, transform, buffer, uploader) → a real gateway process →
PostgreSQL, counted point for point through rows arriving between runs, a report arriving
later for the boundary's date, NULLs, and an agent restart with a row that arrived while it
was down."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials

from .stack import GatewayServer, Identity, agent_config, stored_points, wait_for

pytestmark = pytest.mark.slow

MARIADB_URL = os.environ.get("MARIADB_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")
PARAMETERS = ("depth_drilled", "hours_drilling", "hours_tripping", "hours_npt")


class Reports:
    """A ``daily_reports`` table of its own, and the points its rows must become."""

    def __init__(self, engine: AsyncEngine, table: str) -> None:
        self.engine = engine
        self.table = table
        self.expected: set[Identity] = set()
        self.nulls = 0
        today = datetime.now(UTC).date()
        self.first_day = today - timedelta(days=10)

    def day(self, n: int) -> date:
        return self.first_day + timedelta(days=n)

    async def add(self, well: str, n: int, *, npt: float | None = 1.5) -> None:
        values = {"depth_drilled": 500.0 + n, "hours_drilling": 14.0, "hours_tripping": 6.5,
                  "hours_npt": npt}
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    f"INSERT INTO {self.table} (well_id, report_date, depth_drilled,"
                    " hours_drilling, hours_tripping, hours_npt, comments) VALUES"
                    " (:well, :day, :depth_drilled, :hours_drilling, :hours_tripping,"
                    " :hours_npt, 'drilled ahead')"
                ),
                {"well": well, "day": self.day(n), **values},
            )
        midnight = datetime.combine(self.day(n), datetime.min.time(), UTC)
        for parameter, value in values.items():
            if value is None:
                self.nulls += 1
            else:
                self.expected.add((well, parameter, midnight))


@pytest.fixture
async def reports() -> AsyncIterator[Reports]:
    engine = create_async_engine(MARIADB_URL, poolclass=NullPool)
    table = f"wt_sql_e2e_{secrets.token_hex(4)}"
    async with engine.begin() as conn:
        await conn.execute(text(
            f"CREATE TABLE {table} (id INTEGER AUTO_INCREMENT PRIMARY KEY, well_id VARCHAR(32),"
            " report_date DATE, depth_drilled DECIMAL(10,2), hours_drilling DOUBLE,"
            " hours_tripping DOUBLE, hours_npt DOUBLE, comments VARCHAR(200))"
        ))
    try:
        yield Reports(engine, table)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE {table}"))
        await engine.dispose()


def sql_source(table: str) -> dict[str, Any]:
    return {
        "name": "reports",
        "type": "sql",
        "connection": {"url": MARIADB_URL},
        "queries": [
            {
                "name": "daily_drilling_report",
                "schedule": "* * * * * */1",  # every second, for the test
                "query": (
                    "SELECT well_id, report_date, depth_drilled, hours_drilling,"
                    f" hours_tripping, hours_npt, comments FROM {table}"
                    " WHERE report_date >= :since ORDER BY report_date"
                ),
                "mapping": {
                    "well_id": "well_id",
                    "timestamp": "report_date",
                    "values": [
                        {"column": p, "parameter": p, "unit": "ft" if p == "depth_drilled"
                         else "h"}
                        for p in PARAMETERS
                    ],
                },
            }
        ],
    }


async def drained(agent: Agent) -> bool:
    assert agent.buffer is not None
    return (await agent.buffer.stats()).pending_batches == 0


async def test_daily_reports_reach_postgres_once_each(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str, reports: Reports,
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret
    )
    settings = yaml.safe_load(config.read_text())
    settings["data_sources"] = [sql_source(reports.table)]
    config.write_text(yaml.safe_dump(settings))

    async def stored() -> set[Identity]:
        points = await stored_points(database_url, tenant)
        assert len(points) == len(set(points))
        return set(points)

    async def all_stored() -> bool:
        return await stored() == reports.expected

    for well in ("WELL-A1", "WELL-A2", "WELL-B7"):
        for n in range(3):
            await reports.add(well, n, npt=None if (well, n) == ("WELL-A2", 1) else 1.5)

    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await wait_for(all_stored, timeout=60)
        # Rows arriving between runs: a new day, and a report for the latest day (the
        # watermark's boundary) that was filed late.
        await reports.add("WELL-A1", 3)
        await reports.add("WELL-C3", 2)
        await wait_for(all_stored, timeout=60)
        await agent.stop_collecting()
        await wait_for(lambda: drained(agent), timeout=60)
    finally:
        await agent.stop()
    first_run = agent.metrics.value(
        "ingestion_data_points_collected_total", source="reports", tenant_id=tenant
    )
    assert first_run == len(reports.expected)  # nothing was emitted twice
    assert agent.metrics.value(
        "ingestion_readings_skipped_total", source="reports", reason="no_value"
    ) == reports.nulls == 1

    # A report arrives while the agent is down; the restart reads it at once and only it.
    await reports.add("WELL-B7", 4)
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await wait_for(all_stored, timeout=60)
        await agent.stop_collecting()
        await wait_for(lambda: drained(agent), timeout=60)
    finally:
        await agent.stop()
    assert agent.metrics.value(
        "ingestion_data_points_collected_total", source="reports", tenant_id=tenant
    ) == len(PARAMETERS)
    assert await stored() == reports.expected
    assert len(reports.expected) == (3 * 3 + 3) * len(PARAMETERS) - 1
