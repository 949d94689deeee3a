"""The agent's write-ahead buffer: every collected point is sealed into a batch in SQLite before
anything is sent, and stays there until the gateway acknowledges it.

A sealed batch is the serialized, zlib-compressed ``IngestRequest`` that will be sent, with its
per-agent sequence number, so a resend is byte-identical and the gateway recognises it. A batch
is sealed when it holds ``batch_max_points`` points or its first point has waited ``linger``.
``append`` returns only once the points (and the watermarks given with them) are committed: a
collector's watermark never runs ahead of its data, and ``kill -9`` loses nothing that was
acknowledged as buffered (WAL journal; a crash can only lose the unsealed open batch, whose
collectors have not been told it is safe and re-read it from their watermark).

Bounds, checked as batches are sealed and every minute:

* size cap (``max_size_gb``, the database's used pages): policy ``drop_oldest`` deletes the oldest
  unsent batches, ``block`` makes ``append`` wait until the uploader frees space;
* retention (``retention_days``): batches sealed longer ago are deleted, whatever the policy.

Dropped points are never just counted: the wells, parameters, time ranges and counts they held
become loss records, sealed in the same transaction as the deletion into a batch of their own
(``data_gaps``, no points), which is sent like any other and is itself never dropped.

The database holds nothing that depends on the upload target: changing the gateway address or the
credentials keeps the backlog. The agent id is made once per database, so a new database never
reuses the sequence numbers the gateway has already seen from an old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from edge.readings import Point, add_points
from welltegra.ingest.v1 import ingest_pb2

__all__ = [
    "Buffer",
    "BufferError",
    "BufferStats",
    "CheckReport",
    "PendingBatch",
    "describe_gaps",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
# zlib level 1: the batches' repeated names compress to almost nothing and the values and
# timestamps to about half. Level 6 saves another tenth of the disk at three times the CPU,
# which costs a 1 M-row CSV file a tenth of its speed (bench/csv_ingest.py).
COMPRESSION_LEVEL = 1
MAX_GAPS_PER_BATCH = 1000
# Dropping for the size cap frees a little more than needed, so a full buffer does not drop
# (and write a loss record) on every seal.
CAP_HYSTERESIS = 0.95
ENFORCE_INTERVAL = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    sequence    INTEGER PRIMARY KEY,
    sealed_at   REAL NOT NULL,
    point_count INTEGER NOT NULL,
    gap_count   INTEGER NOT NULL,
    first_ts    REAL,
    last_ts     REAL,
    payload     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_sealed_at ON batches (sealed_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    sequence    INTEGER PRIMARY KEY,
    sealed_at   REAL NOT NULL,
    dead_at     REAL NOT NULL,
    point_count INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS watermarks (
    source     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
"""


class BufferError(Exception):
    """The buffer database cannot be used (not a path that can be written, wrong format)."""


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A sealed batch waiting for acknowledgement, as the uploader sends it."""

    sequence: int
    sealed_at: float
    point_count: int
    gap_count: int
    first_ts: float | None
    last_ts: float | None
    payload: bytes  # the serialized IngestRequest, decompressed


@dataclass(frozen=True, slots=True)
class BufferStats:
    """What ``welltegra-agent buffer stats`` prints and the metrics report."""

    path: str
    agent_id: str
    next_sequence: int
    pending_batches: int
    pending_points: int
    pending_gap_records: int
    oldest_sealed_at: float | None
    oldest_point: float | None
    newest_point: float | None
    dead_letter_batches: int
    dead_letter_points: int
    used_bytes: int
    file_bytes: int
    watermarks: int

    @property
    def bytes_per_point(self) -> float | None:
        return self.used_bytes / self.pending_points if self.pending_points else None

    def as_dict(self) -> dict[str, Any]:
        result = {name: getattr(self, name) for name in self.__slots__}
        result["bytes_per_point"] = self.bytes_per_point
        return result


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The result of ``buffer check``."""

    integrity: str
    batches_checked: int
    quarantined: list[int]


@dataclass(slots=True)
class _OpenBatch:
    """Points collected but not yet sealed; ``sealed`` resolves once they are committed."""

    started: float
    points: list[Point] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # points per source, for counting
    watermarks: dict[tuple[str, str], str] = field(default_factory=dict)
    sealed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def add(self, source: str, points: Sequence[Point]) -> None:
        self.points.extend(points)
        self.sources[source] = self.sources.get(source, 0) + len(points)


@dataclass(slots=True)
class _Gap:
    """Points of one well and parameter lost from the buffer."""

    first: tuple[int, int]
    last: tuple[int, int]
    count: int
    source: str


class Buffer:
    """The buffer database of one agent. Open with ``Buffer.open``; close with ``close``."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        *,
        tenant_id: str,
        agent_id: str,
        next_sequence: int,
        max_bytes: int,
        retention_seconds: float,
        full_policy: Literal["drop_oldest", "block"],
        batch_max_points: int,
        linger: float,
    ) -> None:
        self.path = path
        self.tenant_id = tenant_id
        self.agent_id = agent_id
        self.max_bytes = max_bytes
        self.retention_seconds = retention_seconds
        self.full_policy = full_policy
        self.batch_max_points = batch_max_points
        self.linger = linger
        self._conn = conn
        self._next_sequence = next_sequence
        # One transaction at a time on the one connection; sealing is also serialised by it.
        self._tx = asyncio.Lock()
        self._open: _OpenBatch | None = None
        self._linger_task: asyncio.Task[None] | None = None
        self._enforce_task: asyncio.Task[None] | None = None
        self._space_freed = asyncio.Event()
        self.sealed = asyncio.Event()  # set whenever a batch is sealed; the uploader clears it
        self.in_flight: set[int] = set()  # batches the uploader is sending: never dropped
        self._full_since: float | None = None
        self._dropping = False
        self._closed = False
        self._seal_error_logged = False
        # Counters the agent turns into metrics: dropped points by reason, dead-lettered points.
        self.dropped: dict[str, int] = {"size_cap": 0, "retention": 0}
        # Called with {source: points} each time a batch is committed: what "collected" counts.
        self.on_sealed: Callable[[Mapping[str, int]], None] | None = None
        self.dead_lettered_points = 0

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        tenant_id: str,
        max_size_gb: float = 10.0,
        retention_days: float = 7.0,
        full_policy: Literal["drop_oldest", "block"] = "drop_oldest",
        batch_max_points: int = 1000,
        linger: float = 0.2,
    ) -> Buffer:
        """Open (or create) the database at ``path``. A file that is not a usable buffer
        database is set aside under a new name and a fresh one is made: a damaged file is
        never a reason for the agent not to collect."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferError(f"cannot create the buffer directory {path.parent}: {exc}") from exc
        try:
            conn, agent_id, next_sequence = await _connect(path)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise BufferError(f"cannot open the buffer database {path}: {exc}") from exc
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            log.critical(
                "buffer database %s cannot be read (%s); kept as %s, starting a new one",
                path,
                exc,
                aside,
            )
            await asyncio.to_thread(_set_aside, path, aside)
            conn, agent_id, next_sequence = await _connect(path)
        buffer = cls(
            conn,
            path,
            tenant_id=tenant_id,
            agent_id=agent_id,
            next_sequence=next_sequence,
            max_bytes=int(max_size_gb * 1024**3),
            retention_seconds=retention_days * 86400,
            full_policy=full_policy,
            batch_max_points=batch_max_points,
            linger=linger,
        )
        await buffer.enforce_bounds()
        buffer._enforce_task = asyncio.create_task(buffer._enforce_periodically())
        return buffer

    async def close(self) -> None:
        """Seal what is open, then close the database. Safe to call twice."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self.flush()
        self._closed = True
        for task in (self._linger_task, self._enforce_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._conn.close()

    @property
    def writable(self) -> bool:
        """False while the last attempt to seal a batch failed (a full disk, say)."""
        return not self._closed and not self._seal_error_logged

    # --- collecting ------------------------------------------------------------------------

    async def append(
        self,
        source: str,
        points: Sequence[Point],
        watermarks: Mapping[str, str] | None = None,
    ) -> None:
        """Add ``points`` to the open batch (sealing as batches fill) and return once they and
        ``source``'s ``watermarks`` are committed.

        A bulk append (one that fills a batch itself: a collector catching up, a file) tops up
        the open batch and seals it together with the rest of its points, cut into whole
        batches and the last partial one, in one transaction: the linger exists to let small
        appends share a batch, and waiting it out would only hold the collector back."""
        if self._closed:
            raise BufferError("the buffer is closed")
        marks = {(source, k): v for k, v in (watermarks or {}).items()}
        if len(points) >= self.batch_max_points:
            await self._append_bulk(source, points, marks)
            return
        remaining = points
        while True:
            batch = self._open_batch()
            room = self.batch_max_points - len(batch.points)
            batch.add(source, remaining[:room])
            remaining = remaining[room:]
            if not remaining:
                batch.watermarks.update(marks)
            if len(batch.points) >= self.batch_max_points:
                await self._seal(batch)
            if not remaining:
                break
        await asyncio.shield(batch.sealed)

    async def _append_bulk(
        self, source: str, points: Sequence[Point], marks: dict[tuple[str, str], str]
    ) -> None:
        size = self.batch_max_points
        opened = self._open
        room = size - len(opened.points) if opened is not None else 0
        if opened is not None:
            opened.add(source, points[:room])
        pieces: list[_OpenBatch] = []
        for start in range(room, len(points), size):
            piece = _OpenBatch(started=time.monotonic())
            piece.add(source, points[start : start + size])
            pieces.append(piece)
        last = pieces[-1] if pieces else opened
        assert last is not None  # a bulk append holds at least one batch of points
        last.watermarks.update(marks)
        await self._seal(opened, pieces)
        if opened is not None:
            # Sealed by us, or meanwhile by its linger timer (whose error would be here).
            await asyncio.shield(opened.sealed)

    async def watermark(self, source: str, key: str) -> str | None:
        async with self._conn.execute(
            "SELECT value FROM watermarks WHERE source = ? AND key = ?", (source, key)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def flush(self) -> None:
        """Seal the open batch now (at shutdown, or when a test wants it sent)."""
        if self._open is not None:
            await self._seal(self._open)

    def _open_batch(self) -> _OpenBatch:
        if self._open is None:
            self._open = _OpenBatch(started=time.monotonic())
            self._linger_task = asyncio.create_task(self._seal_after_linger(self._open))
        return self._open

    async def _seal_after_linger(self, batch: _OpenBatch) -> None:
        await asyncio.sleep(self.linger)
        try:
            await self._seal(batch)
        except Exception as exc:  # the waiters got the error; nothing else to tell
            log.debug("sealing after linger failed: %s", exc)

    async def _seal(self, batch: _OpenBatch | None, more: Sequence[_OpenBatch] = ()) -> None:
        """Commit ``batch`` (the open batch, unless it was sealed meanwhile) and ``more``
        (batches that were never open) as the next sequences, in one transaction."""
        async with self._tx:
            if (batch is None or self._open is not batch) and not more:
                return  # sealed meanwhile by the linger timer or a filling append
            await self._wait_for_space()
            # Checked again: waiting for space lets others seal the open batch meanwhile.
            sealing = list(more)
            if batch is not None and self._open is batch:
                self._open = None
                sealing.insert(0, batch)
            try:
                await self._commit_batches([b for b in sealing if b.points or b.watermarks])
            except BaseException as exc:
                for failed in sealing:
                    if not failed.sealed.done():
                        failed.sealed.set_exception(exc)
                raise
            for done in sealing:
                if not done.sealed.done():
                    done.sealed.set_result(None)
                # An open batch lives on in its linger task: let its points go now.
                done.points = []
                done.watermarks = {}

    async def _commit_batches(self, batches: Sequence[_OpenBatch]) -> None:
        if not batches:
            return
        first_sequence = self._next_sequence
        delay = 0.5
        while True:
            try:
                for batch in batches:
                    if batch.points:
                        await self._insert_batch(batch.points, ())
                now = time.time()
                await self._conn.executemany(
                    "INSERT INTO watermarks (source, key, value, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value,"
                    " updated_at = excluded.updated_at",
                    [(s, k, v, now) for b in batches for (s, k), v in b.watermarks.items()],
                )
                await self._conn.commit()
                break
            except sqlite3.OperationalError as exc:
                # A full disk (or a locked file) is waited out: the batches stay in memory
                # and collectors wait on them, so nothing is lost and memory stays bounded.
                await self._conn.rollback()
                self._next_sequence = first_sequence
                if not self._seal_error_logged:
                    log.error("cannot write the buffer (%s); collection waits and retries", exc)
                    self._seal_error_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if self._seal_error_logged:
            log.warning("the buffer is writable again")
            self._seal_error_logged = False
        with_points = [batch for batch in batches if batch.points]
        if with_points:
            self.sealed.set()
            if self.on_sealed is not None:
                for batch in with_points:
                    self.on_sealed(batch.sources)
            if await self._used_bytes() > self.max_bytes:
                await self._drop_for_cap()

    async def _insert_batch(
        self, points: Sequence[Point], gaps: Sequence[ingest_pb2.DataGap]
    ) -> int:
        """Insert one sealed batch inside the caller's transaction; its sequence."""
        sequence = self._next_sequence
        request = ingest_pb2.IngestRequest(
            tenant_id=self.tenant_id, agent_id=self.agent_id, batch_sequence=sequence
        )
        add_points(request.data_points, points)
        request.data_gaps.extend(gaps)
        first_ts = last_ts = None
        if points:
            instants = [p.seconds + p.nanos / 1e9 for p in points]
            first_ts, last_ts = min(instants), max(instants)
        payload = zlib.compress(request.SerializeToString(), COMPRESSION_LEVEL)
        await self._conn.execute(
            "INSERT INTO batches (sequence, sealed_at, point_count, gap_count, first_ts, last_ts,"
            " payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sequence, time.time(), len(points), len(gaps), first_ts, last_ts, payload),
        )
        await self._conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'next_sequence'", (str(sequence + 1),)
        )
        self._next_sequence = sequence + 1
        return sequence

    # --- bounds ----------------------------------------------------------------------------

    async def _used_bytes(self) -> int:
        # One query, not three PRAGMA statements: it runs after every sealed batch.
        async with self._conn.execute(
            "SELECT (page_count - freelist_count) * page_size"
            " FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _wait_for_space(self) -> None:
        """Under the ``block`` policy, wait (holding the seal) until the batch fits."""
        if self.full_policy != "block":
            return
        while await self._used_bytes() > self.max_bytes:
            if self._full_since is None:
                self._full_since = time.monotonic()
                log.warning(
                    "buffer full (%d bytes, cap %d; policy block): collection waits for uploads",
                    await self._used_bytes(),
                    self.max_bytes,
                )
            self._space_freed.clear()
            self._tx.release()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space_freed.wait(), timeout=1.0)
            finally:
                await self._tx.acquire()
        if self._full_since is not None:
            log.warning(
                "buffer has room again after %.1f s; collection resumes",
                time.monotonic() - self._full_since,
            )
            self._full_since = None

    async def _drop_for_cap(self) -> None:
        """Policy ``drop_oldest``: delete the oldest batches until the used size is below the
        cap with some room, recording what they held (inside the caller's lock)."""
        if self.full_policy != "drop_oldest":
            return
        excess = await self._used_bytes() - int(self.max_bytes * CAP_HYSTERESIS)
        if excess <= 0:
            return
        victims: list[tuple[int, bytes]] = []
        freed = 0
        async with self._conn.execute(
            "SELECT sequence, payload FROM batches WHERE point_count > 0 ORDER BY sequence"
        ) as cursor:
            async for sequence, payload in cursor:
                if sequence in self.in_flight:
                    continue
                victims.append((sequence, payload))
                freed += len(payload)
                if freed >= excess:
                    break
        if not victims:
            return
        if not self._dropping:
            self._dropping = True
            log.warning(
                "buffer over its cap of %d bytes: dropping the oldest batches (policy"
                " drop_oldest); loss records are sent to the gateway",
                self.max_bytes,
            )
        dropped = await self._drop(victims, "size_cap")
        await self._conn.commit()
        log.info("dropped %d points in %d batches for the size cap", dropped, len(victims))

    async def enforce_bounds(self) -> None:
        """Retention, then the size cap: run at open and every minute."""
        async with self._tx:
            cutoff = time.time() - self.retention_seconds
            victims = []
            async with self._conn.execute(
                "SELECT sequence, payload FROM batches WHERE point_count > 0 AND sealed_at < ?"
                " ORDER BY sequence",
                (cutoff,),
            ) as cursor:
                async for sequence, payload in cursor:
                    if sequence not in self.in_flight:
                        victims.append((sequence, payload))
            if victims:
                dropped = await self._drop(victims, "retention")
                await self._conn.commit()
                log.warning(
                    "dropped %d points in %d batches older than the retention of %.1f days;"
                    " loss records are sent to the gateway",
                    dropped,
                    len(victims),
                    self.retention_seconds / 86400,
                )
            await self._drop_for_cap()
            if self._dropping and await self._used_bytes() <= self.max_bytes:
                self._dropping = False
            # Give pages freed by acknowledgements back to the file system, a bounded step
            # at a time.
            await self._conn.execute("PRAGMA incremental_vacuum(2000)")

    async def _enforce_periodically(self) -> None:
        while True:
            await asyncio.sleep(ENFORCE_INTERVAL)
            try:
                await self.enforce_bounds()
            except sqlite3.Error as exc:
                log.error("could not enforce the buffer's bounds: %s", exc)

    async def _drop(self, victims: list[tuple[int, bytes]], reason: str) -> int:
        """Delete ``victims`` and seal their loss records, in the caller's transaction."""
        gaps: dict[tuple[str, str], _Gap] = {}
        points = 0
        for sequence, payload in victims:
            try:
                request = _decode(payload)
            except ValueError as exc:
                log.error("batch %d cannot be read while being dropped: %s", sequence, exc)
                continue
            points += len(request.data_points)
            _account(gaps, request.data_points)
        await self._conn.executemany(
            "DELETE FROM batches WHERE sequence = ?", [(s,) for s, _ in victims]
        )
        await self._seal_gaps(gaps, reason)
        self.dropped[reason] = self.dropped.get(reason, 0) + points
        return points

    async def _seal_gaps(self, gaps: Mapping[tuple[str, str], _Gap], reason: str) -> None:
        records = [
            ingest_pb2.DataGap(
                well_id=well,
                parameter_name=parameter,
                first_timestamp={"seconds": gap.first[0], "nanos": gap.first[1]},
                last_timestamp={"seconds": gap.last[0], "nanos": gap.last[1]},
                point_count=gap.count,
                reason=reason,
                source=gap.source,
            )
            for (well, parameter), gap in sorted(gaps.items())
        ]
        for start in range(0, len(records), MAX_GAPS_PER_BATCH):
            await self._insert_batch((), records[start : start + MAX_GAPS_PER_BATCH])
        if records:
            self.sealed.set()

    # --- uploading -------------------------------------------------------------------------

    async def pending(
        self,
        *,
        limit: int,
        sealed_after: float | None = None,
        sealed_before: float | None = None,
    ) -> list[PendingBatch]:
        """Up to ``limit`` unacknowledged batches not in flight, oldest sequence first,
        optionally only those sealed after / before an instant (the two upload lanes).
        A batch that cannot be read is moved to the dead letters, never handed out."""
        query = (
            "SELECT sequence, sealed_at, point_count, gap_count, first_ts, last_ts, payload"
            " FROM batches WHERE sealed_at >= ? AND sealed_at < ? ORDER BY sequence LIMIT ?"
        )
        bounds = (
            sealed_after if sealed_after is not None else float("-inf"),
            sealed_before if sealed_before is not None else float("inf"),
            limit + len(self.in_flight),
        )
        result: list[PendingBatch] = []
        damaged: list[tuple[int, str]] = []
        async with self._conn.execute(query, bounds) as cursor:
            async for row in cursor:
                if row[0] in self.in_flight:
                    continue
                try:
                    payload = zlib.decompress(row[6])
                except zlib.error as exc:
                    damaged.append((row[0], f"damaged: {exc}"))
                    continue
                result.append(
                    PendingBatch(row[0], row[1], row[2], row[3], row[4], row[5], payload)
                )
                if len(result) == limit:
                    break
        for sequence, reason in damaged:
            await self.dead_letter(sequence, reason)
        return result

    async def acknowledge(self, sequences: Iterable[int]) -> None:
        """The gateway has these batches: delete them."""
        rows = [(s,) for s in sequences]
        if not rows:
            return
        async with self._tx:
            await self._conn.executemany("DELETE FROM batches WHERE sequence = ?", rows)
            await self._conn.commit()
        self._space_freed.set()

    async def dead_letter(self, sequence: int, reason: str) -> int:
        """Move a batch the gateway refused (or that cannot be read) to the dead letters, with
        the reason, and record its points as lost to the gateway; the number of points."""
        async with self._tx:
            async with self._conn.execute(
                "SELECT sealed_at, point_count, payload FROM batches WHERE sequence = ?",
                (sequence,),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return 0
            sealed_at, point_count, payload = row
            await self._conn.execute(
                "INSERT OR REPLACE INTO dead_letters (sequence, sealed_at, dead_at, point_count,"
                " reason, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (sequence, sealed_at, time.time(), point_count, reason[:2000], payload),
            )
            await self._conn.execute("DELETE FROM batches WHERE sequence = ?", (sequence,))
            gaps: dict[tuple[str, str], _Gap] = {}
            with contextlib.suppress(ValueError):
                _account(gaps, _decode(payload).data_points)
            await self._seal_gaps(gaps, "dead_letter")
            await self._conn.commit()
        self.dead_lettered_points += point_count
        self._space_freed.set()
        log.error(
            "batch %d (%d points) set aside in the dead letters: %s", sequence, point_count, reason
        )
        return int(point_count)

    # --- operations ------------------------------------------------------------------------

    async def stats(self) -> BufferStats:
        async with self._conn.execute(
            "SELECT count(*), coalesce(sum(point_count), 0), coalesce(sum(gap_count), 0),"
            " min(sealed_at), min(first_ts), max(last_ts) FROM batches"
        ) as cursor:
            batches, points, gap_records, oldest, first_ts, last_ts = await cursor.fetchone()  # type: ignore[misc]
        async with self._conn.execute(
            "SELECT count(*), coalesce(sum(point_count), 0) FROM dead_letters"
        ) as cursor:
            dead_batches, dead_points = await cursor.fetchone()  # type: ignore[misc]
        async with self._conn.execute("SELECT count(*) FROM watermarks") as cursor:
            (watermarks,) = await cursor.fetchone()  # type: ignore[misc]
        file_bytes = await asyncio.to_thread(_file_bytes, self.path)
        return BufferStats(
            path=str(self.path),
            agent_id=self.agent_id,
            next_sequence=self._next_sequence,
            pending_batches=batches,
            pending_points=points,
            pending_gap_records=gap_records,
            oldest_sealed_at=oldest,
            oldest_point=first_ts,
            newest_point=last_ts,
            dead_letter_batches=dead_batches,
            dead_letter_points=dead_points,
            used_bytes=await self._used_bytes(),
            file_bytes=file_bytes,
            watermarks=watermarks,
        )

    async def check(self) -> CheckReport:
        """SQLite's integrity check, then every pending batch decoded; a batch that does not
        decode is quarantined in the dead letters."""
        async with self._conn.execute("PRAGMA integrity_check") as cursor:
            integrity = "; ".join(str(row[0]) for row in await cursor.fetchall())
        checked = 0
        damaged: list[tuple[int, str]] = []
        async with self._conn.execute("SELECT sequence, payload FROM batches") as cursor:
            async for sequence, payload in cursor:
                checked += 1
                try:
                    _decode(payload)
                except ValueError as exc:
                    damaged.append((sequence, f"damaged: {exc}"))
        for sequence, reason in damaged:
            await self.dead_letter(sequence, reason)
        return CheckReport(integrity, checked, [s for s, _ in damaged])

    async def export(self) -> AsyncIterator[str]:
        """Pending batches as JSON lines (for support): sequence, seal time and the request."""
        async with self._conn.execute(
            "SELECT sequence, sealed_at, payload FROM batches ORDER BY sequence"
        ) as cursor:
            async for sequence, sealed_at, payload in cursor:
                try:
                    request: Any = json_format.MessageToDict(
                        _decode(payload), preserving_proto_field_name=True
                    )
                except ValueError as exc:
                    request = {"error": f"damaged: {exc}"}
                yield json.dumps(
                    {"sequence": sequence, "sealed_at": sealed_at, "request": request},
                    separators=(",", ":"),
                )


def _set_aside(path: Path, aside: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").rename(f"{aside}{suffix}")


def _file_bytes(path: Path) -> int:
    """The database and its write-ahead log, as they stand on disk."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += Path(f"{path}{suffix}").stat().st_size
    return total


def _decode(payload: bytes) -> ingest_pb2.IngestRequest:
    try:
        return ingest_pb2.IngestRequest.FromString(zlib.decompress(payload))
    except (zlib.error, DecodeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc


def _account(gaps: dict[tuple[str, str], _Gap], points: Iterable[ingest_pb2.DataPoint]) -> None:
    for point in points:
        instant = (point.timestamp.seconds, point.timestamp.nanos)
        key = (point.well_id, point.parameter_name)
        gap = gaps.get(key)
        if gap is None:
            gaps[key] = _Gap(instant, instant, 1, point.source.partition(":")[0])
        else:
            gap.first = min(gap.first, instant)
            gap.last = max(gap.last, instant)
            gap.count += 1


def describe_gaps(request: ingest_pb2.IngestRequest) -> list[dict[str, Any]]:
    """The loss records of a batch as plain dicts (for logs, tests and ``buffer export``)."""
    return [
        json_format.MessageToDict(gap, preserving_proto_field_name=True)
        for gap in request.data_gaps
    ]


async def _connect(path: Path) -> tuple[aiosqlite.Connection, str, int]:
    conn = await aiosqlite.connect(path)
    try:
        # auto_vacuum only takes effect before the first table exists: set it first.
        await conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        await conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a killed process; only a power cut can lose the last
        # commits, which the collectors re-read from their watermarks.
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.executescript(_SCHEMA)
        async with conn.execute("SELECT key, value FROM meta") as cursor:
            meta: dict[str, str] = {str(k): str(v) for k, v in await cursor.fetchall()}
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"unknown buffer schema version {meta['schema_version']}")
        if "agent_id" not in meta:
            meta = {
                "schema_version": SCHEMA_VERSION,
                "agent_id": f"{socket.gethostname()[:80]}-{secrets.token_hex(4)}",
                "next_sequence": "1",
            }
            await conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items())
            )
            await conn.commit()
        return conn, meta["agent_id"], int(meta["next_sequence"])
    except BaseException:
        await conn.close()
        raise
