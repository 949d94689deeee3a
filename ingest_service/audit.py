"""Audit: every ingest call and every refusal leaves a row in ``system_monitoring.audit_log``.

Rows are written by one background task in batches, so the response path never waits on the audit
insert. The queue is bounded; when it is full (the database has been away for long) the newest
events are dropped, counted and logged once per episode rather than growing memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import astuple, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

__all__ = ["AuditEvent", "AuditLog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited call. ``outcome`` is "accepted", "partial", "duplicate" or "refused"."""

    action: str
    outcome: str
    tenant_id: str | None = None
    subject: str | None = None
    reason: str | None = None
    message: str | None = None
    peer: str | None = None
    ingestion_id: str | None = None
    agent_id: str | None = None
    batch_sequence: int | None = None
    accepted_count: int = 0
    rejected_count: int = 0
    duplicate_count: int = 0
    # An Ingest batch replayed from the agent's backlog, and the data gaps a batch recorded.
    historical: bool = False
    gap_count: int = 0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


_COLUMNS = [f.name for f in fields(AuditEvent)]


_TEXT_LIMIT = 1000


def _printable(event: AuditEvent) -> AuditEvent:
    """Text from callers (agent ids, token claims, messages quoting them) as the database takes
    it: no NUL (PostgreSQL text cannot hold one) and at most 1,000 characters."""
    changes: dict[str, Any] = {}
    for name in _COLUMNS:
        value = getattr(event, name)
        if isinstance(value, str) and ("\x00" in value or len(value) > _TEXT_LIMIT):
            changes[name] = value.replace("\x00", "\\x00")[:_TEXT_LIMIT]
    return replace(event, **changes) if changes else event


class AuditLog:
    """A bounded, batched writer of audit rows."""

    def __init__(self, pool: asyncpg.Pool, max_queue: int = 10_000, batch_size: int = 500) -> None:
        self._pool = pool
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(maxsize=max_queue)
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="audit-writer")

    def record(self, event: AuditEvent) -> None:
        """Queue ``event`` without waiting; never raises."""
        try:
            self._queue.put_nowait(_printable(event))
        except asyncio.QueueFull:
            if self.dropped == 0:
                log.error("audit queue full: audit events are being dropped until it drains")
            self.dropped += 1

    async def flush(self) -> None:
        """Wait until every queued event is written (used at shutdown and by tests)."""
        await self._queue.join()

    async def close(self, timeout: float = 5.0) -> None:
        """Drain what is queued (bounded by ``timeout``), then stop the writer."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)
            for _ in batch:
                self._queue.task_done()

    async def _write(self, batch: list[AuditEvent]) -> None:
        delay = 0.5
        while True:
            try:
                async with self._pool.acquire() as conn:
                    await conn.copy_records_to_table(
                        "audit_log",
                        schema_name="system_monitoring",
                        columns=_COLUMNS,
                        records=[astuple(event) for event in batch],
                    )
                if self.dropped:
                    log.warning("audit queue drained; %d audit events were dropped", self.dropped)
                    self.dropped = 0
                return
            except asyncpg.DataError as exc:
                # A row the database refuses (not an outage): retrying would block every later
                # event for ever. Write the batch row by row and drop only what is refused.
                log.error("audit batch refused (%s); writing it row by row", exc)
                await self._write_each(batch)
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Audit rows matter: keep the batch and retry until the database is back.
                log.warning("audit write failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _write_each(self, batch: list[AuditEvent]) -> None:
        async with self._pool.acquire() as conn:
            for event in batch:
                try:
                    await conn.copy_records_to_table(
                        "audit_log",
                        schema_name="system_monitoring",
                        columns=_COLUMNS,
                        records=[astuple(event)],
                    )
                except asyncpg.DataError as exc:
                    log.error("audit event dropped, the database refuses it: %s (%r)", exc, event)
