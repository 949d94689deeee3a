"""The ``sql`` collector: rows of SQL queries, run on a cron schedule, become points.

Each configured query runs at its ``schedule`` (a cron expression, in the source's
``timezone``), and once at start with ``run_on_start`` so that a restart catches up at once.
Queries run one after the other on a fresh connection (no pool: between runs minutes or hours
pass, and a pooled connection would have gone stale), with ``timeout`` on the statement and on
every fetch, and ``connect_timeout`` on the connection. Rows are fetched ``fetch_rows`` at a
time, so memory stays bounded whatever the result's size.

**Mapping.** ``mapping`` names the column holding the well id (or gives one well for all rows),
the column holding the row's time, and, per numeric column, the parameter and unit it is
written in: each row becomes one reading per mapped column. A NULL becomes a reading without a
value, which the transform counts (``no_value``) and skips; a value that is not a number
likewise (and the run logs how many there were). A row without a time or a well id is skipped
and counted. Every value is GOOD: SQL has no quality. The tag of a reading is
``<query>.<column>``.

**Watermark.** Each query keeps one watermark in the buffer (key ``query:<name>``): the largest
value of its ``watermark.column`` (by default the mapping's timestamp column; an increasing key
such as an identity column or a ``rowversion`` also works) emitted so far, *plus the identities
(well id, time) of the rows that had exactly that value*. The query reads only new rows by
using it as the bound parameter ``:since``, written with ``>=``::

    SELECT ... FROM daily_reports WHERE report_date >= :since ORDER BY report_date

``>=`` (not ``>``) re-reads the rows at the boundary value, so a row that arrives later with the
same value as the last one read is not lost; the rows already emitted at that value are
recognised by their identity and skipped, so nothing is emitted twice. Rows with a value below
the watermark are skipped too, which makes a query without ``:since`` incremental as well (it
just reads more). ``:since`` is bound as the same Python type the driver returned for the
column (a datetime stays naive or aware, a date a date, a key an int, text text), so the
comparison is the database's own. On the very first run ``:since`` is ``watermark.initial``,
by default 1970-01-01 00:00:00 (everything) when the watermark column is the timestamp.

The watermark moves once per run, with the last chunk of readings, only after all of the run's
readings are durable. A run that fails half-way moves nothing; the next run reads those rows
again, and the gateway stores a re-read point once. A timestamp watermark cannot see rows that
are inserted later with a time older than the watermark; when that can happen, use an
increasing key as the watermark column.

Errors: a query that fails (bad SQL, a timeout, a column missing from its result) is logged and
tried again at its next tick; the other queries go on. When a query fails and the database does
not answer a ``SELECT 1`` either, the connection is what failed: the run raises
``CollectorError(retryable=True)`` and the agent restarts the collector with backoff, which
runs every query at once when it is back (``run_on_start``). A driver that is not installed
raises ``CollectorError(retryable=False)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import aiosqlite
from croniter import croniter
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from edge.collectors.base import CollectorError, ReadingSink
from edge.collectors.file_watcher import TimestampParser
from edge.collectors.sql_config import (
    DRIVERS,
    SqlConfig,
    SqlConnection,
    SqlMapping,
    SqlQuery,
    SqlValueColumn,
    SqlWatermark,
)
from edge.readings import Quality, Reading

__all__ = [
    "DRIVERS",
    "QueryReport",
    "SqlCollector",
    "SqlConfig",
    "SqlConnection",
    "SqlMapping",
    "SqlQuery",
    "SqlValueColumn",
    "SqlWatermark",
    "watermark_key",
]

log = logging.getLogger(__name__)

# At most this many row identities are kept at the boundary value; beyond it the boundary rows
# are re-emitted by the next run (the gateway stores them once) instead of growing the state.
BOUNDARY_LIMIT = 10_000
# The first run's ``:since`` when the watermark is the timestamp column: everything.
_BEGINNING = datetime(1970, 1, 1)


def watermark_key(query: str) -> str:
    """The buffer key of a query's watermark."""
    return f"query:{query}"


# --- the watermark ----------------------------------------------------------------------------

_Identity = tuple[str, str]  # (well id, ISO time in UTC)
_WATERMARK_TYPES = (datetime, date, int, float, Decimal, str, bytes)


def _encode(value: object) -> dict[str, Any]:
    """A watermark value as JSON, keeping the Python type the driver gave."""
    if isinstance(value, datetime):
        return {"type": "datetime", "value": value.isoformat()}
    if isinstance(value, date):
        return {"type": "date", "value": value.isoformat()}
    if isinstance(value, bool):
        raise TypeError("a boolean cannot be a watermark")
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, Decimal):
        return {"type": "decimal", "value": str(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"type": "bytes", "value": bytes(value).hex()}
    raise TypeError(f"a {type(value).__name__} cannot be a watermark")


def _decode(data: Mapping[str, Any]) -> object:
    kind, value = data["type"], data["value"]
    if kind == "datetime":
        return datetime.fromisoformat(value)
    if kind == "date":
        return date.fromisoformat(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "decimal":
        return Decimal(value)
    if kind == "str":
        return str(value)
    if kind == "bytes":
        return bytes.fromhex(value)
    raise ValueError(f"unknown watermark type {kind!r}")


def _initial(query: SqlQuery) -> object:
    initial = query.watermark.initial
    if initial is None:
        return _BEGINNING
    if isinstance(initial, str):
        try:
            return datetime.fromisoformat(initial)
        except ValueError:
            return initial
    return initial


def _same_kind(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` compare meaningfully (same type; datetimes alike in having a
    time zone or not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, datetime) and isinstance(b, datetime):
        return (a.tzinfo is None) == (b.tzinfo is None)
    return True


@dataclass(slots=True)
class _QueryState:
    """A query's watermark: the largest value emitted, and the rows emitted at that value."""

    since: object
    boundary: set[_Identity] | None = field(default_factory=set)  # None: not kept (too many)
    stored: bool = False  # read from the buffer (else: the initial value)

    def dump(self) -> str:
        boundary = None if self.boundary is None else sorted(self.boundary)
        return json.dumps(
            {"since": _encode(self.since), "boundary": boundary}, separators=(",", ":")
        )

    @classmethod
    def load(cls, text_value: str) -> _QueryState:
        data = json.loads(text_value)
        boundary = data.get("boundary")
        return cls(
            since=_decode(data["since"]),
            boundary=None if boundary is None else {(str(w), str(t)) for w, t in boundary},
            stored=True,
        )


@dataclass(slots=True)
class _Tracker:
    """What one run saw of the watermark column: its largest value and the rows at it."""

    state: _QueryState
    best: object = None
    at_best: set[_Identity] | None = field(default_factory=set)
    without_value: int = 0

    def seen_before(self, value: object, identity: _Identity) -> bool:
        """Whether a row with this watermark value and identity was emitted by an earlier
        run."""
        since = self.state.since
        if value is None or not _same_kind(value, since):
            return False
        if value < since:  # type: ignore[operator]
            return True
        boundary = self.state.boundary
        return value == since and boundary is not None and identity in boundary

    def note(self, value: object, identity: _Identity) -> None:
        if value is None:
            self.without_value += 1
            return
        if not isinstance(value, _WATERMARK_TYPES) or isinstance(value, bool):
            raise _QueryFailed(
                f"the watermark column holds {type(value).__name__} values, which cannot be a "
                "watermark (use a time, a number or text)"
            )
        best = self.best
        if best is None or not _same_kind(value, best) or value > best:  # type: ignore[operator]
            self.best, self.at_best = value, {identity}
        elif value == best and self.at_best is not None:
            self.at_best.add(identity)
            if len(self.at_best) > BOUNDARY_LIMIT:
                self.at_best = None

    def next_state(self) -> _QueryState | None:
        """The watermark after this run, or None when it does not move."""
        state, best = self.state, self.best
        if best is None:
            return None
        if _same_kind(best, state.since) and best == state.since:
            if state.boundary is None or self.at_best is None:
                return None if state.boundary is None else _QueryState(best, None, True)
            merged = state.boundary | self.at_best
            if merged == state.boundary:
                return None
            return _QueryState(best, merged if len(merged) <= BOUNDARY_LIMIT else None, True)
        if _same_kind(best, state.since) and best < state.since:  # type: ignore[operator]
            return None
        return _QueryState(best, self.at_best, True)


# --- the collector --------------------------------------------------------------------------


class _QueryFailed(Exception):
    """One run of one query failed; the message says why (logged, tried at the next tick)."""


@dataclass(frozen=True, slots=True)
class QueryReport:
    """What one run of one query did."""

    query: str
    rows: int  # rows read
    readings: int  # readings emitted (values, NULLs included)
    skipped_rows: int  # rows without a time or a well id
    emitted_before: int  # rows skipped as already emitted by an earlier run
    invalid_values: int  # values that were not numbers (emitted without a value)
    watermark: str | None  # the watermark stored by this run, if it moved


@dataclass(slots=True)
class _Columns:
    well: int | None
    time: int
    watermark: int
    values: list[tuple[int, str, str, str]]  # (index, parameter, unit, tag)


def _find(keys: Sequence[str], column: str, query: str) -> int:
    try:
        return keys.index(column)
    except ValueError:
        pass
    folded = [i for i, key in enumerate(keys) if key.lower() == column.lower()]
    if len(folded) == 1:
        return folded[0]
    raise _QueryFailed(
        f"column {column!r} is not in the result of query {query!r} "
        f"(its columns: {', '.join(keys)})"
    )


def _number(value: object) -> float | None:
    """A column value as a float; ``ValueError`` when it is not a number."""
    if isinstance(value, float):
        return value
    if isinstance(value, int | Decimal):
        return float(value)
    if isinstance(value, str):
        return float(value)
    raise ValueError(f"{type(value).__name__} is not a number")


def _reason(exc: BaseException) -> str:
    """A driver error in one line, without SQLAlchemy's statement dump and links."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        orig = exc.orig
        return f"{type(orig).__name__}: {orig}".strip()
    if isinstance(exc, TimeoutError):
        return "timed out"
    text_value = str(exc).split("\n", 1)[0]
    return f"{type(exc).__name__}: {text_value}" if text_value else type(exc).__name__


@contextlib.asynccontextmanager
async def _deadline(conn: AsyncConnection, seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout`` around a statement or a fetch. SQLite runs statements in
    aiosqlite's thread, which a cancellation does not stop (and SQLAlchemy's clean-up would wait
    for it): there the deadline also interrupts the statement."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    handle = None
    if isinstance(driver, aiosqlite.Connection):
        loop = asyncio.get_running_loop()
        handle = loop.call_later(seconds, lambda: loop.create_task(driver.interrupt()))
    try:
        async with asyncio.timeout(seconds):
            yield
    finally:
        if handle is not None:
            handle.cancel()


async def _abandon(conn: AsyncConnection) -> None:
    """Drop a connection in an unknown state (timed out, cancelled mid-fetch) without the
    polite close, which could wait for the rest of the result."""
    with contextlib.suppress(Exception):
        await conn.invalidate()


class SqlCollector:
    """The running collector: implements ``Collector``; see the module docstring."""

    def __init__(self, config: SqlConfig) -> None:
        self.config = config
        self._parser = TimestampParser(config.timestamp_format, config.timezone)
        self._states: dict[str, _QueryState] = {}
        self._engine: AsyncEngine | None = None

    def _make_engine(self) -> AsyncEngine:
        url = self.config.connection.engine_url()
        try:
            return create_async_engine(url, poolclass=NullPool)
        except (ModuleNotFoundError, NoSuchModuleError) as exc:
            raise CollectorError(
                f"the database driver for {url.drivername} is not installed ({exc})",
                retryable=False,
            ) from exc

    async def _connect(self) -> AsyncConnection:
        if self._engine is None:
            self._engine = self._make_engine()
        timeout = self.config.connection.connect_timeout.total_seconds()
        try:
            async with asyncio.timeout(timeout):
                return await self._engine.connect()
        except TimeoutError:
            raise TimeoutError(f"no connection within {timeout:g} s") from None

    async def close(self) -> None:
        """Dispose of the engine (there is no pool: nothing stays open between runs)."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # --- Collector ---

    async def probe(self) -> str:
        config = self.config
        where = config.connection.describe()
        try:
            conn = await self._connect()
            try:
                async with _deadline(conn, config.connection.connect_timeout.total_seconds()):
                    await conn.execute(text("SELECT 1"))
                version = conn.dialect.server_version_info
            finally:
                await conn.close()
        except CollectorError:
            raise
        except Exception as exc:  # any driver's error, e.g. an option it does not take
            raise CollectorError(f"cannot query {where}: {_reason(exc)}") from exc
        finally:
            await self.close()
        shown = ".".join(map(str, version)) if version else "unknown version"
        count = len(config.queries)
        return f"{where} (server {shown}), {count} quer{'y' if count == 1 else 'ies'}"

    async def run(self, sink: ReadingSink) -> None:
        """Run every query on its schedule (and all at once at start) until cancelled."""
        config = self.config
        zone = self._parser.zone
        try:
            now = datetime.now(zone)
            due = {q.name: croniter(q.schedule, now).get_next(datetime) for q in config.queries}
            if config.run_on_start:
                await self.run_once(sink)
            while True:
                now = datetime.now(zone)
                name, when = min(due.items(), key=lambda item: item[1])
                wait = (when - now).total_seconds()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                query = next(q for q in config.queries if q.name == name)
                await self._run_scheduled(query, sink)
                # Ticks missed while the query ran are not run twice: the next is after now.
                due[name] = croniter(query.schedule, datetime.now(zone)).get_next(datetime)
        finally:
            await self.close()

    async def run_once(self, sink: ReadingSink) -> list[QueryReport | None]:
        """Run every query once, in order; a failed one is logged and reported as None."""
        return [await self._run_scheduled(query, sink) for query in self.config.queries]

    async def _run_scheduled(self, query: SqlQuery, sink: ReadingSink) -> QueryReport | None:
        try:
            return await self.run_query(query, sink)
        except _QueryFailed as exc:
            failure = str(exc)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            failure = _reason(exc)
        if not await self._alive():
            raise CollectorError(
                f"query {query.name!r} failed and the database does not answer: {failure}"
            )
        log.error(
            "sql %s: query %s failed: %s; trying again at its next tick (%s)",
            self.config.name, query.name, failure, query.schedule,
        )
        return None

    async def _alive(self) -> bool:
        """Whether the database answers ``SELECT 1``: after a query failed, this tells a lost
        database from a bad query."""
        try:
            conn = await self._connect()
            try:
                seconds = self.config.connection.connect_timeout.total_seconds()
                async with _deadline(conn, seconds):
                    await conn.execute(text("SELECT 1"))
            finally:
                await conn.close()
        except CollectorError:
            raise
        except Exception:  # whatever the driver raises, the database did not answer
            return False
        return True

    async def _state(self, query: SqlQuery, sink: ReadingSink) -> _QueryState:
        state = self._states.get(query.name)
        if state is not None:
            return state
        stored = await sink.watermark(watermark_key(query.name))
        if stored is not None:
            try:
                state = _QueryState.load(stored)
            except (ValueError, KeyError, TypeError):
                log.warning(
                    "sql %s: watermark of query %s (%r) cannot be read; starting from %s",
                    self.config.name, query.name, stored[:200], _initial(query),
                )
        if state is None:
            state = _QueryState(since=_initial(query))
        self._states[query.name] = state
        return state

    async def run_query(self, query: SqlQuery, sink: ReadingSink) -> QueryReport:
        """Run ``query`` once: emit its new rows, then move its watermark."""
        config = self.config
        started = time.monotonic()
        state = await self._state(query, sink)
        tracker = _Tracker(state)
        params = {"since": state.since} if query.uses_since else {}
        timeout = query.timeout.total_seconds()
        rows = readings = skipped = before = invalid = 0
        pending: list[Reading] = []
        conn = await self._connect()
        try:
            try:
                async with _deadline(conn, timeout):
                    result = await conn.stream(text(query.query), params)
            except TimeoutError:
                raise _QueryFailed(f"no result within {timeout:g} s") from None
            columns = self._columns(query, list(result.keys()))
            while True:
                try:
                    async with _deadline(conn, timeout):
                        batch = await result.fetchmany(config.fetch_rows)
                except TimeoutError:
                    raise _QueryFailed(f"fetching rows took more than {timeout:g} s") from None
                if not batch:
                    break
                rows += len(batch)
                chunk, counts = self._readings(query, columns, batch, tracker)
                skipped += counts[0]
                before += counts[1]
                invalid += counts[2]
                # The previous chunk goes now; the last one goes with the watermark.
                if pending:
                    await sink.emit(pending)
                    readings += len(pending)
                pending = chunk
        except BaseException:
            await _abandon(conn)
            raise
        else:
            await conn.close()
        new_state = tracker.next_state()
        stored = None
        if new_state is not None:
            stored = new_state.dump()
            await sink.emit(pending, {watermark_key(query.name): stored})
            self._states[query.name] = new_state
        elif pending:
            await sink.emit(pending)
        readings += len(pending)
        if tracker.without_value:
            log.warning(
                "sql %s: query %s: %d rows had no %s value; they were emitted but cannot move "
                "the watermark", config.name, query.name, tracker.without_value,
                query.watermark_column,
            )
        if skipped or invalid:
            log.warning(
                "sql %s: query %s: %d rows skipped (no time or no well id), %d values not "
                "numbers", config.name, query.name, skipped, invalid,
            )
        log.info(
            "sql %s: query %s: %d rows, %d new, %d readings in %.2f s",
            config.name, query.name, rows, rows - before - skipped, readings,
            time.monotonic() - started,
        )
        return QueryReport(query.name, rows, readings, skipped, before, invalid, stored)

    def _columns(self, query: SqlQuery, keys: list[str]) -> _Columns:
        mapping = query.mapping
        return _Columns(
            well=None if mapping.well_id is None else _find(keys, mapping.well_id, query.name),
            time=_find(keys, mapping.timestamp, query.name),
            watermark=_find(keys, query.watermark_column, query.name),
            values=[
                (_find(keys, v.column, query.name), v.parameter, v.unit, f"{query.name}.{v.column}")
                for v in mapping.values
            ],
        )

    def _readings(
        self, query: SqlQuery, columns: _Columns, batch: Sequence[Any], tracker: _Tracker
    ) -> tuple[list[Reading], tuple[int, int, int]]:
        readings: list[Reading] = []
        append = readings.append
        from_value = self._parser.from_value
        fixed_well = query.mapping.well
        good = Quality.GOOD
        skipped = before = invalid = 0
        for row in batch:
            raw_time = row[columns.time]
            well_value = fixed_well if columns.well is None else row[columns.well]
            if raw_time is None or well_value is None:
                skipped += 1
                continue
            well = str(well_value).strip()
            try:
                timestamp = from_value(raw_time)
            except (ValueError, OverflowError):
                skipped += 1
                continue
            if not well:
                skipped += 1
                continue
            identity = (well, timestamp.isoformat())
            mark = row[columns.watermark]
            if tracker.seen_before(mark, identity):
                before += 1
                continue
            tracker.note(mark, identity)
            for index, parameter, unit, tag in columns.values:
                value = row[index]
                number: float | None
                if value is None:
                    number = None
                else:
                    try:
                        number = _number(value)
                    except (ValueError, InvalidOperation):
                        number = None
                        invalid += 1
                append(Reading(well, parameter, timestamp, number, unit, good, tag))
        return readings, (skipped, before, invalid)
