"""The ``file_watcher`` collector end to end: CSV files dropped into a directory → the agent
(settling, chunked reading, transform, buffer, uploader) → a real gateway process →
PostgreSQL, counted point for point: files present at start, a file arriving while the agent
runs, one with bad rows (rejected with their line numbers, the rest stored), and files that
arrive while the agent is down."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials

from .stack import GatewayServer, Identity, agent_config, stored_points, wait_for

pytestmark = pytest.mark.slow

HEADER = ["Timestamp", "Well", "Wellhead Pressure (psi)", "Hookload (klbs)", "Operator note"]
COLUMNS = {"Wellhead Pressure (psi)": "wellhead_pressure", "Hookload (klbs)": "hookload"}


class Drops:
    """Writes CSV files into the watched directory and keeps the points they must become."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.expected: set[Identity] = set()
        self.start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        self.files = 0

    def drop(self, name: str, well: str, first: int, count: int, *,
             bad_lines: tuple[int, ...] = ()) -> None:
        """``count`` rows of ``well`` from second ``first``; ``bad_lines`` (file line numbers)
        get a timestamp that cannot be read. Written under a temporary name, then renamed, as
        a careful writer does."""
        temporary = self.directory / f"{name}.part"
        with temporary.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(HEADER)
            for i in range(first, first + count):
                line = i - first + 2
                instant = self.start + timedelta(seconds=i, milliseconds=125)
                stamp = "not a time" if line in bad_lines else instant.isoformat()
                writer.writerow([stamp, well, 1800 + i % 400, 250 + i % 90, "ok"])
                if line not in bad_lines:
                    self.expected |= {(well, p, instant) for p in COLUMNS.values()}
        temporary.rename(self.directory / name)
        self.files += 1


async def drained(agent: Agent) -> bool:
    assert agent.buffer is not None
    return (await agent.buffer.stats()).pending_batches == 0


async def test_csv_drops_reach_postgres_once_each(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str,
) -> None:
    watch, archive = tmp_path / "drops", tmp_path / "processed"
    watch.mkdir()
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret
    )
    settings = yaml.safe_load(config.read_text())
    source: dict[str, Any] = {
        "name": "csv_watcher",
        "type": "file_watcher",
        "watch_directory": str(watch),
        "archive_directory": str(archive),
        "well_id_column": "Well",
        "timestamp_column": "Timestamp",
        "settle_time": "200ms",
        "chunk_rows": 1000,
        "mapping": [
            {"csv_column": column, "parameter": parameter,
             "unit": "psi" if parameter == "wellhead_pressure" else "klbs"}
            for column, parameter in COLUMNS.items()
        ],
    }
    settings["data_sources"] = [source]
    config.write_text(yaml.safe_dump(settings))
    drops = Drops(watch)

    async def all_stored() -> bool:
        points = await stored_points(database_url, tenant)
        assert len(points) == len(set(points))
        return set(points) == drops.expected

    def archived() -> int:
        return len([p for p in archive.iterdir() if not p.name.endswith(".rejected.csv")])

    # Two files already there when the agent starts, one of several chunks.
    drops.drop("WELL-001_0600.csv", "WELL-001", 0, 2_500)
    drops.drop("WELL-002_0600.csv", "WELL-002", 0, 300)
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await wait_for(all_stored, timeout=90)
        # One arriving while it runs, with two bad rows.
        drops.drop("WELL-003_0700.csv", "WELL-003", 0, 200, bad_lines=(5, 150))
        await wait_for(all_stored, timeout=60)
        await wait_for(_async(lambda: archived() == 3), timeout=30)
        await agent.stop_collecting()
        await wait_for(lambda: drained(agent), timeout=60)
    finally:
        await agent.stop()
    assert agent.metrics.value(
        "ingestion_data_points_collected_total", source="csv_watcher", tenant_id=tenant
    ) == len(drops.expected)
    with (archive / "WELL-003_0700.rejected.csv").open(newline="") as rejected:
        assert [row[0] for row in list(csv.reader(rejected))[1:]] == ["5", "150"]
    assert agent.metrics.value(
        "ingestion_source_records_rejected_total", source="csv_watcher", reason="bad_timestamp"
    ) == 2

    # Files arriving while the agent is down are read when it starts again.
    drops.drop("WELL-001_0800.csv", "WELL-001", 2_500, 400)
    drops.drop("WELL-004_0800.csv", "WELL-004", 0, 50)
    agent = Agent(load_agent_config(config), serve_endpoints=False)
    await agent.start()
    try:
        await wait_for(all_stored, timeout=60)
        await wait_for(_async(lambda: archived() == 5), timeout=30)
        await agent.stop_collecting()
        await wait_for(lambda: drained(agent), timeout=60)
    finally:
        await agent.stop()
    assert agent.metrics.value(
        "ingestion_data_points_collected_total", source="csv_watcher", tenant_id=tenant
    ) == (400 + 50) * len(COLUMNS)
    assert list(watch.iterdir()) == []
    assert len(set(await stored_points(database_url, tenant))) == len(drops.expected) == (
        (2_500 + 300 + 198 + 400 + 50) * len(COLUMNS)
    )


def _async(condition: Any) -> Any:
    async def check() -> bool:
        return bool(condition())

    return check
