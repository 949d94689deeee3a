"""Stage 5 of the pipeline: write accepted points into the tenant's schema in PostgreSQL.

Each batch is one transaction:

1. claim the batch in the tenant's ledger by (agent_id, batch_sequence); a batch already there
   was committed before and is answered as a duplicate without writing anything;
2. ``COPY`` the points into a transaction-local staging table (``ON COMMIT DELETE ROWS``),
   the fastest way into Postgres, which also works when the target is under row-level security;
3. one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` moves them into
   ``<tenant>_streams.real_time_parameters``: a point whose (well_id, parameter_name, ts) is
   already stored is skipped and counted as a duplicate, whichever path it came by;
4. refused points go to the tenant's quarantine, the batch's data gaps (points its agent lost)
   to ``data_gaps``, and the ledger row gets the batch's counts. A duplicate batch stops at 1,
   so its gaps, like its points, are never recorded twice.

Tenant ids are checked against a strict pattern and then still never pasted into SQL text:
schema names are quoted by Postgres' own ``quote_ident`` and every value is a bind parameter.

Transient database errors (a dropped connection, a deadlock, a server starting up) are retried
here, a few times with backoff; after that the call fails with ``StorageUnavailable`` and the
client resends, which the ledger and the point identity make harmless.

Traces: each attempt at a batch's write is a ``store`` span (attempt number, counts), with a
``seal`` span for the encryption and a ``transaction`` span (its end includes the commit) holding
one span per SQL statement, named as below: ``tenant_fence``, ``ledger_claim``, ``copy_staging``,
``insert_points``, ``quarantine``, ``data_gaps``, ``ledger_update``, and ``create_partition``
outside it. A statement span carries its name, verb and table, never the SQL text or a parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from ingest_service.config import StorageConfig
from ingest_service.crypto import (
    KeyProvider,
    KeyringError,
    SealedValue,
    TenantKeyring,
    gap_identity,
    pack_value,
    quarantine_identity,
    row_identity,
)
from ingest_service.errors import StorageUnavailable, UnknownTenant
from ingest_service.keystore import Keystore
from ingest_service.tenancy import check_tenant_id
from ingest_service.tracing import BATCH_POINTS, stage
from ingest_service.validation import GapRecord, QuarantinedPoint, StoredPoint, ValidatedBatch

__all__ = [
    "STAGING_COLUMNS",
    "BatchOutcome",
    "DatabaseUnreachable",
    "Storage",
    "StoredGap",
    "describe_url",
    "prepare_connection",
]

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x5745_4C4C  # pg_advisory_lock key: one gateway migrates at a time
# Control-schema files, applied in order at every start; each is idempotent.
_MIGRATIONS = (
    "001_control.sql",
    "002_limits.sql",
    "003_tenant_keys.sql",
    "004_oauth_clients.sql",
    "005_row_security.sql",
    "006_batch_lanes_and_gaps.sql",
)
# Batch writes run as this role (005_row_security.sql), so row-level security applies to them,
# for the one tenant named (a bind parameter) for the rest of the transaction.
WRITER_ROLE = "welltegra_writer"
TENANT_FENCE = (
    f"SELECT set_config('app.current_tenant', $1, true), set_config('role', '{WRITER_ROLE}', true)"
)
_LIMIT_COLUMNS = ("requests_per_minute", "max_message_bytes", "bytes_per_day")
STAGING_COLUMNS = ("well_id", "parameter_name", "ts", "unit", "key_version", "sealed")
_TRANSIENT = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.AdminShutdownError,
)


class _PartitionMissing(Exception):
    """A write found no partition for its day although we thought one existed; retryable."""


class DatabaseUnreachable(RuntimeError):
    """The database cannot be reached at start; the message says where and why."""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch did to the tenant's data."""

    accepted: int
    rejected: int
    duplicate: int
    duplicate_batch: bool = False
    gaps: int = 0


class StoredGap(NamedTuple):
    """A recorded data gap as the operator's ``gaps`` command reads it back, source decrypted."""

    well_id: str
    parameter_name: str
    first_timestamp: datetime
    last_timestamp: datetime
    point_count: int
    reason: str
    source: str
    agent_id: str
    batch_sequence: int
    ingestion_id: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class _TenantTables:
    """A tenant's qualified, quoted table names, resolved once."""

    schema: str
    points: str
    ledger: str
    quarantine: str
    gaps: str


def describe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "local socket"
    port = f":{parts.port}" if parts.port else ""
    return (
        f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}{port}{parts.path}"
    )


async def _migrate_control(conn: asyncpg.Connection) -> None:
    """The control schema's files, in order, under the migration lock; each is idempotent."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        for name in _MIGRATIONS:
            await conn.execute(_sql(name))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Create the connection's staging table: it lives as long as the connection, its rows as
    long as one transaction. The writer role fills it inside batch transactions."""
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS wt_staging ("
        " well_id text, parameter_name text, ts timestamptz, unit text, key_version integer,"
        " sealed bytea"
        f") ON COMMIT DELETE ROWS; GRANT SELECT, INSERT ON wt_staging TO {WRITER_ROLE}"
    )


def _sql(name: str) -> str:
    return resources.files("ingest_service").joinpath("sql", name).read_text(encoding="utf-8")


class Storage:
    """The gateway's PostgreSQL storage: migrations, tenants, partitions and batch writes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        config: StorageConfig,
        url: str,
        keys: Keystore,
        tracer: Tracer | None = None,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._config = config
        self._url = url
        self._health_conn: asyncpg.Connection | None = None
        self._tenants: dict[str, _TenantTables] = {}
        self._partitions: dict[str, set[date]] = {}
        self._partition_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        url: str,
        config: StorageConfig,
        key_provider: KeyProvider | None = None,
        tracer: Tracer | None = None,
    ) -> Storage:
        """Open the pool and apply migrations; ``DatabaseUnreachable`` with a clear reason.
        Without ``key_provider`` (the master key) nothing can be written or read, but tenants
        can still be listed or dropped."""

        # Day partitions are UTC days, whatever the server's own time zone is.
        settings = {"application_name": "welltegra-ingest", "timezone": "UTC"}
        timeout = config.connect_timeout.total_seconds()
        try:
            # The control schema (and the writer role the pool's connections grant to) first,
            # on a connection of its own.
            conn = await asyncpg.connect(url, timeout=timeout, server_settings=settings)
            try:
                await _migrate_control(conn)
            finally:
                await conn.close()
            pool = await asyncpg.create_pool(
                url,
                min_size=config.pool_min_size,
                max_size=max(config.pool_max_size, config.pool_min_size),
                init=prepare_connection,
                timeout=timeout,
                command_timeout=config.statement_timeout.total_seconds(),
                server_settings=settings,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DatabaseUnreachable(
                f"cannot reach the database at {describe_url(url)}: {exc or type(exc).__name__}"
            ) from exc
        keys = Keystore(pool, key_provider, config.key_cache.total_seconds())
        storage = cls(pool, config, url, keys, tracer)
        await storage.migrate()
        return storage

    async def close(self) -> None:
        if self._health_conn is not None:
            self._health_conn.terminate()
        await asyncio.wait_for(self.pool.close(), self._config.connect_timeout.total_seconds())

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection whose acquire and release are both bounded in time: a database
        that hangs (rather than refusing) must not hold a caller for ever. A connection that
        cannot be reset in time is terminated instead of returned."""
        timeout = self._config.connect_timeout.total_seconds()
        conn = await self.pool.acquire(timeout=timeout)
        try:
            yield conn
        finally:
            await self.pool.release(conn, timeout=timeout)

    async def migrate(self) -> None:
        """Apply the control schema and every known tenant's schema; safe to run again."""
        async with self._connection() as conn:
            await _migrate_control(conn)
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                tenants = await conn.fetch("SELECT tenant_id FROM welltegra.tenants")
                for row in tenants:
                    await self._create_tenant_schema(conn, row["tenant_id"])
                    if self.keys.can_wrap:
                        await self.keys.create_first_key(conn, row["tenant_id"])
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the database answers within ``timeout``. Uses a connection of its own, so a
        pool exhausted by stuck calls cannot make a healthy database look down, nor a hung
        database keep the answer waiting."""
        try:
            async with asyncio.timeout(timeout):
                if self._health_conn is None or self._health_conn.is_closed():
                    self._health_conn = await asyncpg.connect(self._url, timeout=timeout)
                await self._health_conn.fetchval("SELECT 1")
            return True
        except (TimeoutError, *_TRANSIENT, asyncpg.PostgresError):
            if self._health_conn is not None:
                self._health_conn.terminate()
                self._health_conn = None
            return False

    # Tenants -----------------------------------------------------------------------------

    async def create_tenant(self, tenant_id: str) -> bool:
        """Register ``tenant_id`` and create its schema; False if it already existed."""
        check_tenant_id(tenant_id)
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            inserted = await conn.fetchval(
                "INSERT INTO welltegra.tenants (tenant_id, schema_name) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                tenant_id,
                f"{tenant_id}_streams",
            )
            await self._create_tenant_schema(conn, tenant_id)
            await self.keys.create_first_key(conn, tenant_id)
        return bool(inserted)

    async def drop_tenant(self, tenant_id: str) -> bool:
        """Delete ``tenant_id``: its schema with every stored point, and its registration.
        Audit rows stay. False if there was no such tenant."""
        check_tenant_id(tenant_id)
        async with self._connection() as conn, conn.transaction():
            # Under the migration lock, so a gateway starting meanwhile cannot re-create it.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            deleted = await conn.fetchval(
                "DELETE FROM welltegra.tenants WHERE tenant_id = $1 RETURNING true", tenant_id
            )
            schema = await conn.fetchval("SELECT quote_ident($1)", f"{tenant_id}_streams")
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self._tenants.pop(tenant_id, None)
        self._partitions.pop(tenant_id, None)
        return bool(deleted)

    async def read_points(
        self,
        tenant_id: str,
        well_id: str | None = None,
        parameter_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[StoredPoint]:
        """The tenant's stored points, decrypted, in time order: the operator's read inside
        the cloud (``welltegra-ingest query``). No RPC reaches this."""
        async with self._connection() as conn, conn.transaction():
            tables = await self._tenant(conn, tenant_id)
            keyring = await self.keys.keyring(conn, tenant_id)
            # Under FORCE row-level security a non-superuser owner sees only this tenant's rows.
            await conn.execute("SELECT set_config('app.current_tenant', $1, true)", tenant_id)
            cursor = conn.cursor(
                "SELECT well_id, parameter_name, ts, unit, key_version, sealed"
                f" FROM {tables.points}"
                " WHERE ($1::text IS NULL OR well_id = $1)"
                " AND ($2::text IS NULL OR parameter_name = $2)"
                " AND ($3::timestamptz IS NULL OR ts >= $3)"
                " AND ($4::timestamptz IS NULL OR ts < $4)"
                " ORDER BY ts, well_id, parameter_name",
                well_id,
                parameter_name,
                since,
                until,
            )
            async for row in cursor:
                identity = row_identity(tenant_id, row["well_id"], row["parameter_name"], row["ts"])
                secret = SealedValue.decode(
                    keyring.open(row["key_version"], row["sealed"], identity)
                )
                yield StoredPoint(
                    well_id=row["well_id"],
                    parameter_name=row["parameter_name"],
                    timestamp=row["ts"],
                    value=secret.value,
                    unit=row["unit"],
                    quality_code=secret.quality_code,
                    source=secret.source,
                    original_value=secret.original_value,
                    original_unit=secret.original_unit,
                )

    async def read_gaps(
        self,
        tenant_id: str,
        well_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> AsyncIterator[StoredGap]:
        """The tenant's recorded data gaps, newest first (by the time of their last lost point),
        at most ``limit``; ``since`` keeps the gaps that end at or after it. The operator's read
        (``welltegra-ingest gaps``); no RPC reaches this."""
        async with self._connection() as conn, conn.transaction():
            tables = await self._tenant(conn, tenant_id)
            keyring = await self.keys.keyring(conn, tenant_id)
            await conn.execute("SELECT set_config('app.current_tenant', $1, true)", tenant_id)
            cursor = conn.cursor(
                "SELECT well_id, parameter_name, first_timestamp, last_timestamp, point_count,"
                " reason, key_version, sealed_source, agent_id, batch_sequence, ingestion_id,"
                f" gap_index, received_at FROM {tables.gaps}"
                " WHERE ($1::text IS NULL OR well_id = $1)"
                " AND ($2::timestamptz IS NULL OR last_timestamp >= $2)"
                " ORDER BY last_timestamp DESC, id DESC LIMIT $3",
                well_id,
                since,
                limit,
            )
            async for row in cursor:
                identity = gap_identity(tenant_id, row["ingestion_id"], row["gap_index"])
                source = keyring.open(row["key_version"], row["sealed_source"], identity)
                yield StoredGap(
                    well_id=row["well_id"],
                    parameter_name=row["parameter_name"],
                    first_timestamp=_aware(row["first_timestamp"]),
                    last_timestamp=_aware(row["last_timestamp"]),
                    point_count=row["point_count"],
                    reason=row["reason"],
                    source=source.decode(),
                    agent_id=row["agent_id"],
                    batch_sequence=row["batch_sequence"],
                    ingestion_id=row["ingestion_id"],
                    received_at=row["received_at"],
                )

    async def limit_overrides(self, tenant_id: str) -> dict[str, int]:
        """The tenant's own limits (only those set), by column name. Bounded in time: it runs
        on every call's path (cached), and a hung database must not hold the call here."""
        async with (
            asyncio.timeout(self._config.connect_timeout.total_seconds()),
            self._connection() as conn,
        ):
            row = await conn.fetchrow(
                f"SELECT {', '.join(_LIMIT_COLUMNS)} FROM welltegra.tenant_limits"
                " WHERE tenant_id = $1",
                tenant_id,
            )
        return {k: v for k, v in (row or {}).items() if v is not None}

    async def set_limit_overrides(self, tenant_id: str, overrides: dict[str, int | None]) -> None:
        """Set (or with None, clear) a tenant's own limits; ``UnknownTenant`` if not created."""
        unknown = set(overrides) - set(_LIMIT_COLUMNS)
        if unknown:
            raise ValueError(f"not a limit: {sorted(unknown)}")
        async with self._connection() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT true FROM welltegra.tenants WHERE tenant_id = $1", tenant_id
            ):
                raise UnknownTenant(f"tenant {tenant_id!r} does not exist")
            await conn.execute(
                "INSERT INTO welltegra.tenant_limits (tenant_id) VALUES ($1)"
                " ON CONFLICT DO NOTHING",
                tenant_id,
            )
            for column, value in overrides.items():  # column names come from _LIMIT_COLUMNS
                await conn.execute(
                    f"UPDATE welltegra.tenant_limits SET {column} = $2, updated_at = now()"
                    " WHERE tenant_id = $1",
                    tenant_id,
                    value,
                )

    async def list_tenants(self) -> list[str]:
        rows = await self.pool.fetch("SELECT tenant_id FROM welltegra.tenants ORDER BY 1")
        return [row["tenant_id"] for row in rows]

    async def _create_tenant_schema(self, conn: asyncpg.Connection, tenant_id: str) -> None:
        tables = await self._resolve(conn, tenant_id)
        schema_literal, tenant_literal = await conn.fetchrow(
            "SELECT quote_literal($1), quote_literal($2)", f"{tenant_id}_streams", tenant_id
        )
        await conn.execute(
            _sql("tenant.sql").format(
                schema=tables.schema, schema_literal=schema_literal, tenant_literal=tenant_literal
            )
        )
        today = datetime.now(UTC).date()
        days = [
            today + timedelta(days=n) for n in range(-1, self._config.partitions_ahead_days + 1)
        ]
        await self._create_partitions(conn, tenant_id, tables, days)

    async def _resolve(self, conn: asyncpg.Connection, tenant_id: str) -> _TenantTables:
        cached = self._tenants.get(tenant_id)
        if cached is not None:
            return cached
        schema = await conn.fetchval("SELECT quote_ident($1)", f"{tenant_id}_streams")
        tables = _TenantTables(
            schema=schema,
            points=f"{schema}.real_time_parameters",
            ledger=f"{schema}.batch_ledger",
            quarantine=f"{schema}.quarantine",
            gaps=f"{schema}.data_gaps",
        )
        self._tenants[tenant_id] = tables
        return tables

    async def check_provisioned(self, tenant_id: str) -> None:
        """``UnknownTenant`` unless the tenant was created: checked before anything else is
        spent on a call (limits state, parsing), and cached once the tenant is known."""
        if tenant_id in self._partitions:
            return
        try:
            async with (
                asyncio.timeout(self._config.connect_timeout.total_seconds()),
                self._connection() as conn,
            ):
                await self._tenant(conn, tenant_id)
        except (*_TRANSIENT, asyncpg.PostgresError, TimeoutError) as exc:
            raise StorageUnavailable("storage is unavailable; retry later") from exc

    async def _tenant(self, conn: asyncpg.Connection, tenant_id: str) -> _TenantTables:
        """The tables of a provisioned tenant; ``UnknownTenant`` if it was never created."""
        if tenant_id in self._partitions:
            return self._tenants[tenant_id]
        known = await conn.fetchval(
            "SELECT true FROM welltegra.tenants WHERE tenant_id = $1", tenant_id
        )
        if not known:
            raise UnknownTenant(f"tenant {tenant_id!r} is not provisioned on this gateway")
        tables = await self._resolve(conn, tenant_id)
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent"
            " JOIN pg_namespace n ON n.oid = p.relnamespace"
            " WHERE n.nspname = $1 AND p.relname = 'real_time_parameters'",
            f"{tenant_id}_streams",
        )
        self._partitions[tenant_id] = {
            datetime.strptime(row["relname"][-8:], "%Y%m%d").date() for row in rows
        }
        return tables

    async def _create_partitions(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        tables: _TenantTables,
        days: list[date],
    ) -> None:
        known = self._partitions.setdefault(tenant_id, set())
        for day in days:
            if day in known:
                continue
            name = await conn.fetchval(
                "SELECT quote_ident($1)", f"real_time_parameters_p{day:%Y%m%d}"
            )
            # Bounds are formatted from date objects, never from request text, as UTC instants.
            start, end = day.isoformat(), (day + timedelta(days=1)).isoformat()
            # Another gateway may create it between our check and our create: that is fine. The
            # savepoint keeps a caller's transaction usable after that error.
            with (
                self._statement("create_partition", "CREATE TABLE", "real_time_parameters"),
                contextlib.suppress(
                    asyncpg.exceptions.DuplicateTableError, asyncpg.UniqueViolationError
                ),
            ):
                async with conn.transaction():
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {tables.schema}.{name}"
                        f" PARTITION OF {tables.points}"
                        f" FOR VALUES FROM ('{start} 00:00+00') TO ('{end} 00:00+00')"
                    )
            known.add(day)

    async def _ensure_partitions(
        self, conn: asyncpg.Connection, tenant_id: str, tables: _TenantTables, days: set[date]
    ) -> None:
        missing = days - self._partitions.get(tenant_id, set())
        if missing:
            # Outside the batch's transaction, so the DDL lock is held only for the create.
            async with self._partition_lock:
                await self._create_partitions(conn, tenant_id, tables, sorted(missing))

    # Writes ------------------------------------------------------------------------------

    async def store_batch(
        self,
        tenant_id: str,
        batch: ValidatedBatch,
        ingestion_id: str,
        agent_id: str | None = None,
        batch_sequence: int | None = None,
    ) -> BatchOutcome:
        """Commit ``batch`` for ``tenant_id`` in one transaction, with retries on transient
        errors; ``StorageUnavailable`` when the database stays away."""
        budget = self._config.batch_timeout.total_seconds()
        deadline = asyncio.get_running_loop().time() + budget
        attributes = {"db.system": "postgresql", BATCH_POINTS: len(batch.accepted)}
        try:
            async with asyncio.timeout_at(deadline):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type((*_TRANSIENT, _PartitionMissing)),
                    stop=stop_after_attempt(3) | stop_after_delay(budget),
                    wait=wait_exponential_jitter(multiplier=0.1, max=1.0, jitter=0.1),
                    reraise=True,
                ):
                    # One span per attempt: a retried write shows each try and why it failed.
                    number = attempt.retry_state.attempt_number
                    with attempt, stage(
                        self._tracer, "store", {**attributes, "welltegra.store.attempt": number}
                    ) as span:
                        outcome = await self._write(
                            tenant_id, batch, ingestion_id, agent_id, batch_sequence, deadline
                        )
                        span.set_attributes(
                            {
                                "welltegra.batch.accepted": outcome.accepted,
                                "welltegra.batch.duplicate": outcome.duplicate,
                                "welltegra.batch.duplicate_batch": outcome.duplicate_batch,
                            }
                        )
                        return outcome
        except KeyringError as exc:
            # The gateway's master key does not open this tenant's data key: an operator's
            # problem; the client is told to retry later and nothing is stored unsealed.
            log.error("cannot seal for %s: %s", tenant_id, exc)
            raise StorageUnavailable("storage is unavailable; retry later") from exc
        except (*_TRANSIENT, _PartitionMissing, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("storing batch %s for %s failed: %r", ingestion_id, tenant_id, exc)
            raise StorageUnavailable("storage is unavailable; retry later") from exc
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _write(
        self,
        tenant_id: str,
        batch: ValidatedBatch,
        ingestion_id: str,
        agent_id: str | None,
        batch_sequence: int | None,
        deadline: float,
    ) -> BatchOutcome:
        async with self._connection() as conn:
            # Cancelling a query does not end the wait on a hung server (the rollback that
            # follows waits too); closing the socket at the deadline ends every wait at once.
            watchdog = asyncio.get_running_loop().call_at(deadline, conn.terminate)
            try:
                return await self._write_on(
                    conn, tenant_id, batch, ingestion_id, agent_id, batch_sequence
                )
            except asyncpg.CheckViolationError as exc:
                if "no partition" not in str(exc):
                    raise
                # A partition we remembered is gone (dropped by an operator): forget what we
                # know of this tenant's partitions and let the retry create it again.
                self._partitions.pop(tenant_id, None)
                raise _PartitionMissing(str(exc)) from exc
            finally:
                watchdog.cancel()

    async def _write_on(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        batch: ValidatedBatch,
        ingestion_id: str,
        agent_id: str | None,
        batch_sequence: int | None,
    ) -> BatchOutcome:
        tables = await self._tenant(conn, tenant_id)
        keyring = await self.keys.keyring(conn, tenant_id)
        await self._ensure_partitions(
            conn, tenant_id, tables, {p.timestamp.date() for p in batch.accepted}
        )
        # Sealed before the transaction opens, so it is held only for the writes.
        with stage(self._tracer, "seal", {BATCH_POINTS: len(batch.accepted)}):
            records = _seal_points(keyring, tenant_id, batch.accepted)
            quarantined = [
                _seal_rejection(keyring, tenant_id, ingestion_id, q) for q in batch.rejected
            ]
            gaps = [
                _seal_gap(keyring, tenant_id, ingestion_id, agent_id, batch_sequence, g)
                for g in batch.gaps
            ]
        with stage(self._tracer, "transaction", {"db.system": "postgresql"}):
            async with conn.transaction():
                return await self._write_transaction(
                    conn, tables, tenant_id, batch, records, quarantined, gaps, ingestion_id,
                    agent_id, batch_sequence,
                )

    async def _write_transaction(
        self,
        conn: asyncpg.Connection,
        tables: _TenantTables,
        tenant_id: str,
        batch: ValidatedBatch,
        records: list[tuple[Any, ...]],
        quarantined: list[tuple[Any, ...]],
        gaps: list[tuple[Any, ...]],
        ingestion_id: str,
        agent_id: str | None,
        batch_sequence: int | None,
    ) -> BatchOutcome:
        """The statements of one batch's transaction (the caller opens and commits it)."""
        # Row-level security's fence for this transaction: the writer role, this tenant.
        with self._statement("tenant_fence", "SELECT", "set_config"):
            await conn.execute(TENANT_FENCE, tenant_id)
        ledgered = agent_id is not None and batch_sequence is not None
        if ledgered:
            with self._statement("ledger_claim", "INSERT", "batch_ledger") as span:
                claimed = await conn.fetchval(
                    f"INSERT INTO {tables.ledger}"
                    " (tenant_id, agent_id, batch_sequence, ingestion_id)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
                    tenant_id,
                    agent_id,
                    batch_sequence,
                    ingestion_id,
                )
                span.set_attribute("welltegra.db.claimed", bool(claimed))
            if not claimed:
                # Committed before: its valid points are stored, its refused ones are
                # in quarantine already. Nothing is written again.
                return BatchOutcome(
                    accepted=0,
                    rejected=len(batch.rejected),
                    duplicate=len(batch.accepted),
                    duplicate_batch=True,
                )
        accepted = await self._insert_points(
            conn, tables, tenant_id, records, ingestion_id, agent_id, batch_sequence
        )
        if quarantined:
            await self._quarantine(conn, tables, quarantined)
        if gaps:
            await self._record_gaps(conn, tables, gaps)
        outcome = BatchOutcome(
            accepted=accepted,
            rejected=len(batch.rejected),
            duplicate=len(batch.accepted) - accepted,
            gaps=len(gaps),
        )
        if ledgered:
            with self._statement("ledger_update", "UPDATE", "batch_ledger"):
                await conn.execute(
                    f"UPDATE {tables.ledger} SET accepted_count = $3, rejected_count = $4,"
                    " duplicate_count = $5, gap_count = $6"
                    " WHERE agent_id = $1 AND batch_sequence = $2",
                    agent_id,
                    batch_sequence,
                    outcome.accepted,
                    outcome.rejected,
                    outcome.duplicate,
                    outcome.gaps,
                )
        return outcome

    def _statement(
        self, name: str, operation: str, table: str
    ) -> contextlib.AbstractContextManager[Span]:
        """The span of one SQL statement: its name, verb and table (unqualified), never its
        text or its parameters."""
        return stage(
            self._tracer,
            name,
            {
                "db.system": "postgresql",
                "db.operation.name": operation,
                "db.collection.name": table,
                "welltegra.db.statement": name,
            },
            SpanKind.CLIENT,
        )

    async def _insert_points(
        self,
        conn: asyncpg.Connection,
        tables: _TenantTables,
        tenant_id: str,
        records: list[tuple[Any, ...]],
        ingestion_id: str,
        agent_id: str | None,
        batch_sequence: int | None,
    ) -> int:
        if not records:
            return 0
        with self._statement("copy_staging", "COPY", "wt_staging") as span:
            await conn.copy_records_to_table("wt_staging", columns=STAGING_COLUMNS, records=records)
            span.set_attribute("welltegra.db.rows", len(records))
        columns = ", ".join(STAGING_COLUMNS)
        with self._statement("insert_points", "INSERT", "real_time_parameters") as span:
            status = await conn.execute(
                f"INSERT INTO {tables.points}"
                f" (tenant_id, ingestion_id, agent_id, batch_sequence, {columns})"
                f" SELECT $1, $2, $3, $4, {columns} FROM pg_temp.wt_staging"
                " ON CONFLICT (well_id, parameter_name, ts) DO NOTHING",
                tenant_id,
                ingestion_id,
                agent_id,
                batch_sequence,
            )
            # The status is "INSERT 0 <rows>": the rows that were new. Staging empties itself
            # at commit (ON COMMIT DELETE ROWS); a rolled-back transaction leaves no rows behind.
            inserted = int(status.rsplit(" ", 1)[-1])
            span.set_attribute("welltegra.db.rows", inserted)
        return inserted

    async def _quarantine(
        self, conn: asyncpg.Connection, tables: _TenantTables, rows: list[tuple[Any, ...]]
    ) -> None:
        with self._statement("quarantine", "INSERT", "quarantine"):
            await conn.executemany(
                f"INSERT INTO {tables.quarantine} (tenant_id, ingestion_id, point_index, well_id,"
                " parameter_name, ts, field, key_version, sealed, sealed_reason)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                rows,
            )

    async def _record_gaps(
        self, conn: asyncpg.Connection, tables: _TenantTables, rows: list[tuple[Any, ...]]
    ) -> None:
        with self._statement("data_gaps", "INSERT", "data_gaps"):
            await conn.executemany(
                f"INSERT INTO {tables.gaps} (tenant_id, agent_id, batch_sequence, ingestion_id,"
                " gap_index, well_id, parameter_name, first_timestamp, last_timestamp,"
                " point_count, reason, key_version, sealed_source)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                rows,
            )


def _aware(moment: datetime) -> datetime:
    """asyncpg stores Python's first and last instants (0001-01-01, 9999-12-31T23:59:59.999999)
    as -infinity and infinity, and reads those back without a time zone: give it back."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _seal_points(
    keyring: TenantKeyring, tenant_id: str, points: list[StoredPoint]
) -> list[tuple[Any, ...]]:
    """Staging rows: identity and canonical unit in clear, the rest sealed to the row. The hot
    path of encryption: one pass, no object per point beyond what COPY needs."""
    sealed = keyring.seal_many(
        [
            (
                pack_value(p.value, p.original_value, p.original_unit, p.quality_code, p.source),
                row_identity(tenant_id, p.well_id, p.parameter_name, p.timestamp),
            )
            for p in points
        ]
    )
    version = keyring.version
    return [
        (p.well_id, p.parameter_name, p.timestamp, p.unit, version, s)
        for p, s in zip(points, sealed, strict=True)
    ]


def _seal_rejection(
    keyring: TenantKeyring, tenant_id: str, ingestion_id: str, q: QuarantinedPoint
) -> tuple[Any, ...]:
    """A quarantine row: the point as sent and the reason (it may quote the value), sealed."""
    secret = SealedValue(q.value, q.value, q.unit, q.quality_code, q.source)
    identity = quarantine_identity(tenant_id, ingestion_id, q.index)
    return (
        tenant_id,
        ingestion_id,
        q.index,
        q.well_id,
        q.parameter_name,
        q.timestamp,
        q.field,
        keyring.version,
        keyring.seal(secret.encode(), identity),
        keyring.seal(q.reason.encode(), identity + b"\x1freason"),
    )


def _seal_gap(
    keyring: TenantKeyring,
    tenant_id: str,
    ingestion_id: str,
    agent_id: str | None,
    batch_sequence: int | None,
    gap: GapRecord,
) -> tuple[Any, ...]:
    """A data_gaps row: what was lost in clear, the source sealed as a stored point's is."""
    if agent_id is None or batch_sequence is None:
        # The contract carries gaps only in Ingest batches, which always have both.
        raise ValueError("data gaps belong to an Ingest batch, with its agent and sequence")
    return (
        tenant_id,
        agent_id,
        batch_sequence,
        ingestion_id,
        gap.index,
        gap.well_id,
        gap.parameter_name,
        gap.first_timestamp,
        gap.last_timestamp,
        gap.point_count,
        gap.reason,
        keyring.version,
        keyring.seal(gap.source.encode(), gap_identity(tenant_id, ingestion_id, gap.index)),
    )
