"""The ``sql`` collector against real databases: this machine's MariaDB, the session's
PostgreSQL (the machine's or the embedded one) and SQLite files. Each test makes its own
uniquely named table and drops it.

What is shown: the column mapping (one reading per mapped column, NULLs as readings without a
value), the per-query watermark across restarts (no duplicates, no gaps, rows arriving between
runs, rows arriving later with the boundary's timestamp), a key column as the watermark, a
broken or slow query that does not stop the others, a lost database that fails the run for the
agent to restart, the cron schedule, ``probe()``, and the configuration's checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from edge.collectors.base import CollectorError
from edge.collectors.sql import SqlCollector, SqlConfig, watermark_key
from edge.config import AgentConfigError, load_agent_config
from edge.readings import Quality
from tests.collector_support import MemorySink, load_sample, sample_text

ROOT = Path(__file__).parents[2]
MARIADB_URL = os.environ.get("MARIADB_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")
BASE = datetime(2026, 3, 1, 6, 0, 0)  # naive: the tables hold times without a time zone


@dataclass
class Database:
    """One backend with one fresh table, ``wt_sql_<random>``."""

    kind: str
    url: str
    engine: AsyncEngine
    table: str

    async def execute(self, statement: str, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        async with self.engine.begin() as conn:
            if rows:
                await conn.execute(text(statement.format(t=self.table)), list(rows))
            else:
                await conn.execute(text(statement.format(t=self.table)))

    async def insert(self, *rows: tuple[int, str | None, datetime | None, float | None]) -> None:
        """Rows of (id, well, time, depth); the hours are derived from the id."""
        await self.execute(
            "INSERT INTO {t} (id, well_id, report_date, depth_drilled, hours_drilling,"
            " hours_tripping, hours_npt, comments) VALUES (:id, :well, :ts, :depth, :hd, :ht,"
            " :hn, 'ok')",
            [
                {
                    "id": row_id, "well": well, "ts": ts, "depth": depth,
                    "hd": 10 + row_id % 5, "ht": 4.5, "hn": None if row_id % 2 else 1.25,
                }
                for row_id, well, ts, depth in rows
            ],
        )


TYPES = {
    # kind: (time column, numeric column)
    "sqlite": ("TEXT", "REAL"),
    "mariadb": ("DATETIME(6)", "DECIMAL(10,2)"),
    "postgresql": ("TIMESTAMP", "NUMERIC(10,2)"),
}


@pytest.fixture(params=["sqlite", "mariadb", "postgresql"])
async def db(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> AsyncIterator[Database]:
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'reports.db'}"
    elif kind == "mariadb":
        url = MARIADB_URL
    else:
        url = database_url
    table = f"wt_sql_{secrets.token_hex(4)}"
    engine_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(engine_url, poolclass=NullPool)
    time_type, number_type = TYPES[kind]
    database = Database(kind, url, engine, table)
    await database.execute(
        f"CREATE TABLE {{t}} (id INTEGER PRIMARY KEY, well_id VARCHAR(32),"
        f" report_date {time_type}, depth_drilled {number_type}, hours_drilling REAL,"
        f" hours_tripping REAL, hours_npt REAL, comments VARCHAR(200))"
    )
    try:
        yield database
    finally:
        await database.execute("DROP TABLE {t}")
        await engine.dispose()


def report_query(table: str, name: str = "daily_drilling_report", **extra: Any) -> dict[str, Any]:
    """The spec's daily drilling report as a query entry, reading only new rows."""
    return {
        "name": name,
        "schedule": "0 6 * * *",
        "query": (
            "SELECT well_id, report_date, depth_drilled, hours_drilling, hours_tripping,"
            f" hours_npt, comments FROM {table} WHERE report_date >= :since"
            " ORDER BY report_date"
        ),
        "mapping": {
            "well_id": "well_id",
            "timestamp": "report_date",
            "values": [
                {"column": "depth_drilled", "parameter": "depth_drilled", "unit": "ft"},
                {"column": "hours_drilling", "parameter": "hours_drilling", "unit": "h"},
                {"column": "hours_tripping", "parameter": "hours_tripping", "unit": "h"},
                {"column": "hours_npt", "parameter": "hours_npt", "unit": "h"},
            ],
        },
        **extra,
    }


def collector(db: Database, *queries: dict[str, Any], **settings: Any) -> SqlCollector:
    config = SqlConfig.model_validate(
        {
            "name": "reports",
            "connection": {"url": db.url},
            "queries": list(queries) or [report_query(db.table)],
            **settings,
        }
    )
    built = config.build()
    assert isinstance(built, SqlCollector)
    return built


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def utc(seconds: float) -> datetime:
    return at(seconds).replace(tzinfo=UTC)


async def test_rows_become_one_reading_per_mapped_column(db: Database) -> None:
    await db.insert((1, "WELL-001", at(0), 812.5), (2, "WELL-002", at(0), None),
                    (3, "WELL-001", at(86400), 640.25))
    sink = MemorySink()
    [report] = await collector(db).run_once(sink)
    assert report is not None
    assert (report.rows, report.readings, report.skipped_rows) == (3, 12, 0)
    by_key = {(r.well_id, r.parameter, r.timestamp): r for r in sink.readings}
    assert len(by_key) == 12
    depth = by_key[("WELL-001", "depth_drilled", utc(0))]
    assert (depth.value, depth.unit, depth.quality) == (812.5, "ft", Quality.GOOD)
    assert depth.tag == "daily_drilling_report.depth_drilled"
    assert by_key[("WELL-001", "hours_drilling", utc(86400))].value == 13.0
    assert by_key[("WELL-001", "hours_tripping", utc(0))].unit == "h"
    # NULLs become readings without a value (the transform counts and skips them).
    assert by_key[("WELL-002", "depth_drilled", utc(0))].value is None
    assert by_key[("WELL-001", "hours_npt", utc(0))].value is None  # id 1: odd → NULL
    assert by_key[("WELL-002", "hours_npt", utc(0))].value == 1.25
    assert all(r.timestamp.tzinfo is UTC for r in sink.readings)


async def test_watermark_across_restarts_no_duplicates_no_gaps(db: Database) -> None:
    sink = MemorySink()
    await db.insert((1, "WELL-001", at(0), 1.0), (2, "WELL-002", at(0), 2.0),
                    (3, "WELL-001", at(60), 3.0))
    [first] = await collector(db).run_once(sink)
    assert first is not None and first.readings == 12
    assert watermark_key("daily_drilling_report") in sink.watermarks

    # A restart (a new collector, the same stored watermarks) reads nothing again.
    [again] = await collector(db).run_once(sink)
    assert again is not None
    assert (again.readings, again.emitted_before) == (0, 1)  # the boundary row, recognised

    # Rows arriving between runs: newer ones, and one with exactly the boundary's timestamp
    # (another well's report of the same instant, committed late).
    await db.insert((4, "WELL-003", at(60), 4.0), (5, "WELL-001", at(120), 5.0),
                    (6, "WELL-002", at(120), 6.0))
    restarted = collector(db)
    [third] = await restarted.run_once(sink)
    assert third is not None and third.readings == 12
    # And one more at the new boundary, read by the same collector instance.
    await db.insert((7, "WELL-003", at(120), 7.0))
    [fourth] = await restarted.run_once(sink)
    assert fourth is not None and fourth.readings == 4
    # Every row at the boundary is remembered, those of earlier runs too.
    [fifth] = await collector(db).run_once(sink)
    assert fifth is not None and (fifth.readings, fifth.emitted_before) == (0, 3)

    identities = sink.identities()
    assert len(identities) == len(set(identities)), "a reading was emitted twice"
    wells_at = {(1, "WELL-001", 0), (2, "WELL-002", 0), (3, "WELL-001", 60),
                (4, "WELL-003", 60), (5, "WELL-001", 120), (6, "WELL-002", 120),
                (7, "WELL-003", 120)}
    parameters = ("depth_drilled", "hours_drilling", "hours_tripping", "hours_npt")
    expected = {(well, p, utc(s)) for _, well, s in wells_at for p in parameters}
    assert set(identities) == expected


async def test_query_without_since_is_incremental_too(db: Database) -> None:
    query = report_query(db.table)
    query["query"] = (
        f"SELECT well_id, report_date, depth_drilled, hours_drilling, hours_tripping, hours_npt"
        f" FROM {db.table}"
    )
    sink = MemorySink()
    await db.insert((1, "WELL-001", at(0), 1.0), (2, "WELL-001", at(10), 2.0))
    await collector(db, query).run_once(sink)
    await db.insert((3, "WELL-002", at(10), 3.0), (4, "WELL-001", at(20), 4.0))
    [report] = await collector(db, query).run_once(sink)
    assert report is not None
    assert (report.rows, report.emitted_before, report.readings) == (4, 2, 8)
    identities = sink.identities()
    assert len(identities) == len(set(identities)) == 16


async def test_a_key_column_watermark_catches_rows_with_older_timestamps(db: Database) -> None:
    query = report_query(db.table, watermark={"column": "id", "initial": 0})
    query["query"] = (
        "SELECT id, well_id, report_date, depth_drilled, hours_drilling, hours_tripping,"
        f" hours_npt FROM {db.table} WHERE id >= :since ORDER BY id"
    )
    sink = MemorySink()
    await db.insert((1, "WELL-001", at(100), 1.0), (2, "WELL-001", at(200), 2.0))
    await collector(db, query).run_once(sink)
    # A report for an earlier time, inserted later: a timestamp watermark would miss it.
    await db.insert((3, "WELL-002", at(50), 3.0))
    [report] = await collector(db, query).run_once(sink)
    assert report is not None and report.readings == 4
    assert {r.timestamp for r in sink.readings if r.well_id == "WELL-002"} == {utc(50)}
    assert len(sink.readings) == 12 == len(set(sink.identities()))


async def test_rows_without_time_or_well_are_skipped_and_counted(db: Database) -> None:
    await db.insert((1, None, at(0), 1.0), (2, "WELL-001", None, 2.0), (3, "WELL-001", at(5), 3.0))
    sink = MemorySink()
    [report] = await collector(db).run_once(sink)
    assert report is not None
    # The NULL time is filtered by the database (NULL >= :since is not true).
    assert report.skipped_rows == 1 and report.readings == 4
    assert {r.well_id for r in sink.readings} == {"WELL-001"}


async def test_a_broken_or_slow_query_does_not_stop_the_others(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await db.insert((1, "WELL-001", at(0), 1.0))
    missing_column = report_query(db.table, name="missing_column")
    missing_column["mapping"]["values"][0]["column"] = "no_such_column"
    slow = {
        "postgresql": "SELECT pg_sleep(5)",
        "mariadb": "SELECT SLEEP(5)",
        # A recursive count that takes far longer than the timeout.
        "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
                  " SELECT max(x) FROM c",
    }[db.kind]
    queries = [
        report_query(db.table, name="first"),
        report_query(db.table, name="bad_sql", query=f"SELECT nothing FROM {db.table}_absent"),
        missing_column,
        report_query(db.table, name="slow", query=slow, timeout="300ms"),
        report_query(db.table, name="last"),
    ]
    sink = MemorySink()
    caplog.set_level(logging.ERROR, "edge.collectors.sql")
    reports = await collector(db, *queries).run_once(sink)
    assert [r is not None for r in reports] == [True, False, False, False, True]
    assert {r.tag.split(".")[0] for r in sink.readings} == {"first", "last"}
    assert "query bad_sql failed" in caplog.text
    assert "'no_such_column' is not in the result of query 'missing_column'" in caplog.text
    assert "query slow failed" in caplog.text
    # The failed queries moved no watermark: they read from the start when fixed.
    assert set(sink.watermarks) == {watermark_key("first"), watermark_key("last")}


async def test_an_unreachable_database_fails_the_run_for_the_agent_to_retry(
    tmp_path: Path,
) -> None:
    config = SqlConfig.model_validate(
        {
            "name": "reports",
            "connection": {
                "url": "mysql+aiomysql://root:s3cret-pw@127.0.0.1:1/test",
                "connect_timeout": "2s",
            },
            "queries": [report_query("daily_reports")],
        }
    )
    with pytest.raises(CollectorError) as failed:
        await config.build().run(MemorySink())
    assert failed.value.retryable
    assert "does not answer" in str(failed.value)
    with pytest.raises(CollectorError) as probed:
        await config.build().probe()
    assert "127.0.0.1:1" in str(probed.value) and "s3cret-pw" not in str(probed.value)


async def test_probe_says_what_it_found(db: Database) -> None:
    found = await collector(db).probe()
    assert {"sqlite": "sqlite+aiosqlite", "mariadb": "mysql+aiomysql",
            "postgresql": "postgresql+asyncpg"}[db.kind] in found
    assert "1 query" in found


async def test_the_schedule_runs_queries_at_their_cron_ticks(tmp_path: Path) -> None:
    # SQLite only: the scheduler does not depend on the database.
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", poolclass=NullPool)
    db = Database("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", engine, "reports")
    await db.execute(
        "CREATE TABLE {t} (id INTEGER PRIMARY KEY, well_id TEXT, report_date TEXT,"
        " depth_drilled REAL, hours_drilling REAL, hours_tripping REAL, hours_npt REAL,"
        " comments TEXT)"
    )
    await db.insert((1, "WELL-001", at(0), 1.0))
    sink = MemorySink()
    every_second = report_query(db.table, schedule="* * * * * *")
    task = asyncio.create_task(collector(db, every_second, run_on_start=False).run(sink))
    try:
        await poll(lambda: len(sink.readings) == 4)
        await db.insert((2, "WELL-001", at(10), 2.0), (3, "WELL-002", at(10), 3.0))
        await poll(lambda: len(sink.readings) == 12)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.dispose()
    assert len(set(sink.identities())) == 12


async def test_naive_times_are_in_the_sources_time_zone(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    engine = create_async_engine(url, poolclass=NullPool)
    db = Database("sqlite", url, engine, "reports")
    await db.execute(
        "CREATE TABLE {t} (id INTEGER PRIMARY KEY, well_id TEXT, report_date TEXT,"
        " depth_drilled REAL, hours_drilling REAL, hours_tripping REAL, hours_npt REAL,"
        " comments TEXT)"
    )
    await db.insert((1, "WELL-001", datetime(2026, 7, 1, 6, 0), 1.0),
                    (2, "WELL-001", datetime(2026, 1, 1, 6, 0), 1.0))
    sink = MemorySink()
    await collector(db, timezone="Europe/London").run_once(sink)
    await engine.dispose()
    assert {r.timestamp for r in sink.readings} == {
        datetime(2026, 7, 1, 5, 0, tzinfo=UTC),  # BST
        datetime(2026, 1, 1, 6, 0, tzinfo=UTC),  # GMT
    }


async def test_a_time_zone_aware_column_round_trips_its_watermark(database_url: str) -> None:
    table = f"wt_sql_{secrets.token_hex(4)}"
    url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url, poolclass=NullPool)
    db = Database("postgresql", database_url, engine, table)
    await db.execute(
        "CREATE TABLE {t} (id INTEGER PRIMARY KEY, well_id TEXT, report_date TIMESTAMPTZ,"
        " depth_drilled REAL, hours_drilling REAL, hours_tripping REAL, hours_npt REAL,"
        " comments TEXT)"
    )
    try:
        aware = [(i, "WELL-001", utc(i * 10), float(i)) for i in range(1, 4)]
        await db.insert(*aware[:2])
        sink = MemorySink()
        await collector(db).run_once(sink)
        await db.insert(aware[2])
        [report] = await collector(db).run_once(sink)
        assert report is not None and report.readings == 4
        assert len(sink.identities()) == len(set(sink.identities())) == 12
    finally:
        await db.execute("DROP TABLE {t}")
        await engine.dispose()


async def poll(condition: Any, timeout: float = 10) -> None:
    """Wait until ``condition()`` holds (the condition is what is tested, not the time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- configuration ---------------------------------------------------------------------------


def test_the_sample_config_loads(tmp_path: Path) -> None:
    # The documentation shows the sample as it is (Telegraf's sample.conf habit).
    doc = (ROOT / "docs" / "collectors" / "sql.md").read_text()
    assert sample_text("sql") in doc
    environ = {"SQL_USERNAME": "reader", "SQL_PASSWORD": "pw-from-env"}
    config = load_sample(tmp_path, "sql", environ=environ)
    [source_config] = config.data_sources
    assert isinstance(source_config, SqlConfig)
    assert [q.name for q in source_config.queries] == ["daily_drilling_report"]
    url = source_config.connection.engine_url()
    assert url.drivername == "mssql+aioodbc" and url.password == "pw-from-env"
    assert "pw-from-env" not in source_config.connection.describe()
    # Every parameter the sample maps is in the registry, in a unit it accepts.
    registry = config.registry()
    for value in source_config.queries[0].mapping.values:
        parameter = registry.get(value.parameter)
        assert parameter is not None and value.unit in parameter.conversions


GOOD = {
    "name": "r",
    "type": "sql",
    "connection": {"url": "postgresql://u:p@db/x"},
    "queries": [report_query("t")],
}


def with_changes(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node: Any = config
        *path, last = dotted.split("__")
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (with_changes(connection={"url": "postgresql://u:p@db/x", "host": "h"}),
         "either url or driver"),
        (with_changes(connection={"url": "postgresql+psycopg2://u:hunter2@db/x"}),
         "'postgresql+psycopg2' is not one the agent can use"),
        (with_changes(connection={"driver": "postgresql", "database": "x"}),
         "host is required"),
        (with_changes(connection={"driver": "sqlite", "database": "x.db", "host": "h"}),
         "sqlite takes only database"),
        (with_changes(queries__0__schedule="every day"), "not a cron expression"),
        (with_changes(queries__0__mapping__well="W"), "exactly one of well_id"),
        (with_changes(queries__0__watermark={"column": "id"}), "watermark.initial is required"),
        (with_changes(queries__0__mapping__values=[]), "at least one column"),
        (with_changes(queries=[]), "at least one query"),
        (with_changes(connection={"url": "not a url"}), "not a database URL"),
        (with_changes(timezone="Mars/Olympus"), "not a time zone"),
        (with_changes(queries__0__unknown=1), "xtra"),
    ],
)
def test_bad_configuration_is_refused_at_load(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        SqlConfig.model_validate(config)
    messages = " ".join(str(e["msg"]) for e in refused.value.errors())
    assert message in messages
    assert "hunter2" not in messages


def test_bad_configuration_is_reported_with_its_path_and_without_secrets(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    bad_url = with_changes(connection={"url": "postgresql+psycopg2://u:${DB_PASSWORD}@db/x"})
    bad_url["name"] = "other"
    path.write_text(yaml.safe_dump({
        "tenant": {"id": "operator_test"},
        "api": {"grpc_target": "127.0.0.1:50051"},
        "oauth": {"token_url": "https://id.example.com/token", "client_id": "a",
                  "client_secret": "s"},
        "data_sources": [with_changes(queries__0__schedule="soon"), bad_url],
    }))
    with pytest.raises(AgentConfigError) as refused:
        load_agent_config(path, environ={"DB_PASSWORD": "hunter2"})
    assert refused.value.problems == (
        f"{path}: data_sources[0] (r).queries[0] (daily_drilling_report).schedule: 'soon' is "
        "not a cron expression such as '0 6 * * *' (06:00 every day); a sixth field gives "
        "seconds",
        f"{path}: data_sources[1] (other).connection: url: driver 'postgresql+psycopg2' is "
        "not one the agent can use; use one of mariadb+aiomysql, mariadb+asyncmy, "
        "mssql+aioodbc, mysql+aiomysql, mysql+asyncmy, postgresql+asyncpg, sqlite+aiosqlite",
    )
