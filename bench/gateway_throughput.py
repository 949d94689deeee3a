"""Throughput of the ingest gateway, beside the ceiling of the database it writes to.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/gateway_throughput.py [--points 200000] [--streams 4] [--batch 1000]

Each of the (default 3) runs measures, into fresh tenants so that no run sees another's rows:

* **gateway**: ``--points`` points over ``--streams`` concurrent ``Ingest`` client streams, each
  carrying many batches of ``--batch`` points; points/s is the points over the wall time from
  the first write to the last stream's response (a stream's response comes after its last batch
  is committed, so the clock stops on committed data).
* **batch latency**: in client streaming the moment a batch commits is not visible to the
  client, so the proxy is a second phase of one-batch ``Ingest`` calls, ``--streams`` callers in
  parallel (the same concurrency as the first phase), each timed from the call's start to its
  response. That is the batch's whole trip (auth, parse, validate, ledger, COPY, INSERT, commit,
  cache) plus the cost of one HTTP/2 stream and one token check per call, which a long-lived
  stream pays once; so it slightly overstates a streamed batch's latency, never understates it.
* **ceiling**: the same rows written straight to Postgres, from as many connections as streams,
  through the gateway's own write path: per batch, one transaction that ``COPY``s the batch into a
  temp staging table and moves it with the same ``INSERT … SELECT … ON CONFLICT DO NOTHING`` into
  the tenant's ``real_time_parameters``. This, not a bare ``COPY`` into the table, is the honest
  ceiling: the gateway's contract (each batch committed on its own, a resent point stored once)
  needs exactly this SQL, so no gateway could go faster than it on this database; what the gateway
  adds on top of it (gRPC, protobuf, validation, ledger, audit, Redis) is what the ratio shows.
  A bare ``COPY`` of the same batches straight into the partitioned table (which cannot skip
  duplicates, so the gateway could not use it) is reported beside it as "raw COPY", to show what
  the de-duplication itself costs.

The gateway runs in a separate process (a ``multiprocessing`` spawn child running ``Gateway``,
as ``welltegra-ingest serve --dev`` does), because on 2 cores a load generator in the same
process would share, and steal, the gateway's event loop and GIL. The load generator sends
pre-serialised requests and pre-built COPY records, so its own CPU use during a timed phase is
as small as it can be. A short warm-up runs first (gRPC connections, database pools, prepared
statements, lazy imports and caches on both sides), and every figure reported is the median
over the runs.

The output is a human-readable table followed by exactly one line of JSON, the last line:
``{"points_per_s": …, "ceiling_points_per_s": …, "ratio": …, "p50_ms": …, "p99_ms": …, …}``.
See bench/README.md for how to read each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from redis import asyncio as aioredis

from ingest_service.config import GatewayConfig, StorageConfig, load_config
from ingest_service.crypto import SealedValue
from ingest_service.devkeys import DevSigningKey
from ingest_service.server import Gateway

# The gateway's migration lock: holding it while dropping our tenants keeps a gateway that is
# starting meanwhile (its migrate() re-creates every registered tenant's schema) from bringing
# a schema back between our DELETE and our DROP.
from ingest_service.storage import STAGING_COLUMNS, Storage, prepare_connection
from welltegra.ingest.v1 import ingest_pb2

INGEST_METHOD = "/welltegra.ingest.v1.IngestService/Ingest"
MAX_BATCH = 1000  # the gateway refuses more points per batch (validation.MAX_POINTS)

# Canonical units only: the gateway's unit conversion is then the identity, so the ceiling can
# COPY exactly the rows the gateway stores (value == original_value) without redoing it.
_PARAMETERS = (
    ("wellhead_pressure", "psi", 6_750.0),
    ("hookload", "klbs", 215.0),
    ("flow_rate", "bbl/day", 1_200.0),
    ("downhole_temperature", "degF", 212.0),
)
_WELLS_PER_STREAM = 8
_TICK_US = 100_000  # 10 Hz sensors: every (well, parameter) gets one point per 100 ms
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

log = logging.getLogger("bench")


# --------------------------------------------------------------------------------------------
# The workload: built once, before any clock starts, and reused by every run (each run writes
# into fresh tenants, so the same points are new to each of them).


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch, both as the gateway receives it and as the ceiling COPYs it."""

    payload: bytes  # a serialised IngestRequest
    records: list[tuple[Any, ...]]  # the same points as rows of the staging table

    @property
    def size(self) -> int:
        return len(self.records)


@dataclass(frozen=True, slots=True)
class Workload:
    streams: list[list[Batch]]  # the throughput phase: one list of batches per stream
    callers: list[list[Batch]]  # the latency phase: one list of one-batch calls per caller

    @property
    def points(self) -> int:
        return sum(b.size for s in self.streams for b in s)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


# nonce + AES-GCM tag + a sealed value with its unit and source, as the gateway stores it.
_SEALED_STAND_IN = os.urandom(
    12 + 16 + len(SealedValue(1.0, 1.0, "psi", "GOOD", "SCADA_OPC_UA").encode())
)


def _batches(prefix: str, agent_id: str, points: int, batch: int, base_us: int) -> list[Batch]:
    """``points`` points of one sender in batches of ``batch``. Point ``j`` is one of
    ``_WELLS_PER_STREAM`` wells × 4 parameters at tick ``j // 32``: (well, parameter, ts) is
    unique, which the table's primary key needs for every point to be new."""
    combos = _WELLS_PER_STREAM * len(_PARAMETERS)
    wells = [f"{prefix}_WELL_{w:03d}" for w in range(_WELLS_PER_STREAM)]
    result: list[Batch] = []
    for sequence, start in enumerate(range(0, points, batch), start=1):
        request = ingest_pb2.IngestRequest(agent_id=agent_id, batch_sequence=sequence)
        records: list[tuple[Any, ...]] = []
        for j in range(start, min(start + batch, points)):
            well = wells[j % _WELLS_PER_STREAM]
            name, unit, typical = _PARAMETERS[(j // _WELLS_PER_STREAM) % len(_PARAMETERS)]
            ts_us = base_us + (j // combos) * _TICK_US
            value = typical + (j % 997) * 0.01
            point = request.data_points.add(
                well_id=well,
                parameter_name=name,
                value=value,
                unit=unit,
                quality_code="GOOD",
                source="SCADA_OPC_UA",
            )
            seconds, micros = divmod(ts_us, 1_000_000)
            point.timestamp.seconds = seconds
            point.timestamp.nanos = micros * 1000
            ts = _EPOCH + timedelta(microseconds=ts_us)
            # The order of storage.STAGING_COLUMNS, as the gateway's COPY sends them, with a
            # stand-in ciphertext of the real one's size: the ceiling measures the database.
            records.append((well, name, ts, unit, 1, _SEALED_STAND_IN))
        result.append(Batch(request.SerializeToString(), records))
    return result


def build_workload(points: int, streams: int, batch: int, latency_batches: int) -> Workload:
    # Yesterday from midnight UTC: the tenant schema pre-creates yesterday's and today's
    # partitions, so every row lands in a partition that exists (the ceiling cannot create one
    # on demand as the gateway does), and the data stays in the past for up to 24 hours of ticks,
    # so the validator's "not in the future" rule refuses none of it.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    base_us = (today - timedelta(days=1) - _EPOCH) // timedelta(microseconds=1)
    streams_batches = [
        _batches(f"S{s:02d}", f"bench-stream-{s}", n, batch, base_us)
        for s, n in enumerate(_split(points, streams))
    ]
    # Other wells than the streams', so the latency phase writes new points into the same tenant.
    callers = [
        _batches(f"L{c:02d}", f"bench-latency-{c}", n * batch, batch, base_us)
        for c, n in enumerate(_split(latency_batches, streams))
    ]
    return Workload(streams_batches, callers)


# --------------------------------------------------------------------------------------------
# The gateway, in its own process


def _gateway_child(
    conn: Connection,
    data_dir: str,
    database_url: str,
    redis_url: str,
    tenants: list[str],
    profile_path: str | None,
) -> None:
    """Entry point of the gateway process: start, provision ``tenants``, say "ready", serve until
    the parent says stop (or goes away), then stop gracefully."""
    logging.basicConfig(
        level=logging.WARNING, format="gateway: %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_serve_gateway(conn, data_dir, database_url, redis_url, tenants, profile_path))


async def _serve_gateway(
    conn: Connection,
    data_dir: str,
    database_url: str,
    redis_url: str,
    tenants: list[str],
    profile_path: str | None,
) -> None:
    gateway = Gateway(gateway_config(data_dir), database_url, redis_url)
    try:
        try:
            port = await gateway.start()
            for tenant in tenants:
                await gateway.storage.create_tenant(tenant)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        profiler = cProfile.Profile() if profile_path else None
        conn.send(("ready", port))
        if profiler is not None:
            profiler.enable()
        # Any message, or the pipe closing because the parent died, means stop.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), stop.set)
        await stop.wait()
        loop.remove_reader(conn.fileno())
        if profiler is not None and profile_path is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gateway.audit.flush(), 30)
    finally:
        await gateway.stop(grace=1)


def gateway_config(data_dir: str) -> GatewayConfig:
    # --dev: trust the development signing key in data_dir, which the parent mints tokens with
    # (and seal with a development master key made there). Limits stay on, as in production,
    # but raised far above what the benchmark sends, so their cost is measured, not their effect.
    return load_config(
        overrides={
            "grpc_listen": "127.0.0.1:0",
            "data_dir": data_dir,
            "dev": True,
            "limits": {"requests_per_minute": 10_000_000, "bytes_per_day": 10**15},
        },
        environ={},
    )


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    pid: int
    port: int


@contextlib.asynccontextmanager
async def gateway_process(
    data_dir: str,
    database_url: str,
    redis_url: str,
    tenants: list[str],
    profile_path: str | None,
) -> AsyncIterator[GatewayProcess]:
    """A gateway in a spawned child process (spawn, not fork: grpc's threads do not survive a
    fork, and a clean interpreter is what ``welltegra-ingest serve`` would be)."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=_gateway_child,
        args=(child_end, data_dir, database_url, redis_url, tenants, profile_path),
        name="welltegra-gateway",
    )
    process.start()
    child_end.close()
    try:
        if not await asyncio.to_thread(parent_end.poll, 120):
            raise RuntimeError("the gateway did not start within 120 s")
        try:
            message = parent_end.recv()
        except EOFError:
            raise RuntimeError(
                f"the gateway process exited at start (exit code {process.exitcode})"
            ) from None
        if message[0] != "ready":
            raise RuntimeError(f"the gateway could not start: {message[1]}")
        assert process.pid is not None
        yield GatewayProcess(pid=process.pid, port=message[1])
    finally:
        with contextlib.suppress(OSError):
            parent_end.send("stop")
        await asyncio.to_thread(process.join, 60)
        if process.is_alive():
            process.terminate()  # our own child, by its handle
            await asyncio.to_thread(process.join, 10)
        parent_end.close()


# --------------------------------------------------------------------------------------------
# The phases


@dataclass(slots=True)
class RunResult:
    gateway_pps: float = 0.0
    ceiling_pps: float = 0.0
    raw_copy_pps: float = 0.0
    latency_pps: float = 0.0  # points/s of the latency phase's one-batch calls
    latencies_s: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.gateway_pps / self.ceiling_pps if self.ceiling_pps else 0.0

    def percentile_ms(self, q: int) -> float:
        return percentile(self.latencies_s, q) * 1000


def percentile(samples: Sequence[float], q: int) -> float:
    """The q-th percentile, interpolated between the two nearest samples."""
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def ingest_callable(channel: grpc.aio.Channel) -> Any:
    # No request serializer: the requests are already bytes, so the load generator spends no CPU
    # on protobuf while the clock runs.
    return channel.stream_unary(
        INGEST_METHOD,
        request_serializer=None,
        response_deserializer=ingest_pb2.IngestResponse.FromString,
    )


async def _send(ingest: Any, token: str, batches: Sequence[Batch]) -> ingest_pb2.IngestResponse:
    """One Ingest call carrying ``batches``; checks every point was accepted as new."""
    call = ingest(metadata=(("authorization", f"Bearer {token}"),))
    for batch in batches:
        await call.write(batch.payload)
    await call.done_writing()
    response: ingest_pb2.IngestResponse = await call
    expected = sum(b.size for b in batches)
    if response.accepted_count != expected:
        raise RuntimeError(
            f"gateway accepted {response.accepted_count} of {expected} points "
            f"(rejected {response.rejected_count}, duplicate {response.duplicate_count})"
        )
    return response


async def gateway_phase(ingests: Sequence[Any], token: str, streams: list[list[Batch]]) -> float:
    """Points/s of all streams at once: first write to the last response (= last commit)."""
    started = time.perf_counter()
    await asyncio.gather(*(_send(i, token, s) for i, s in zip(ingests, streams, strict=True)))
    elapsed = time.perf_counter() - started
    return sum(b.size for s in streams for b in s) / elapsed


async def latency_phase(
    ingests: Sequence[Any], token: str, callers: list[list[Batch]]
) -> tuple[list[float], float]:
    """Per-batch latency proxy: each caller sends its batches as one-batch Ingest calls, one
    after the other, on its own connection; returns every call's seconds and the points/s."""

    async def caller(ingest: Any, batches: list[Batch]) -> list[float]:
        seconds = []
        for batch in batches:
            started = time.perf_counter()
            await _send(ingest, token, [batch])
            seconds.append(time.perf_counter() - started)
        return seconds

    started = time.perf_counter()
    per_caller = await asyncio.gather(
        *(caller(i, c) for i, c in zip(ingests, callers, strict=True))
    )
    elapsed = time.perf_counter() - started
    points = sum(b.size for c in callers for b in c)
    return [s for seconds in per_caller for s in seconds], points / elapsed


def _schema(tenant: str) -> str:
    # Tenant ids match ^[a-z][a-z0-9_]{1,47}$ (tenancy.TENANT_ID_PATTERN): quoting is enough.
    return f'"{tenant}_streams"'


async def ceiling_phase(pool: asyncpg.Pool, tenant: str, streams: list[list[Batch]]) -> float:
    """Points/s of storage's own write path without the gateway: per batch one transaction of
    COPY into the temp staging table + INSERT … SELECT … ON CONFLICT DO NOTHING, the same SQL as
    Storage._insert_points, one connection per stream."""
    columns = ", ".join(STAGING_COLUMNS)
    insert = (
        f"INSERT INTO {_schema(tenant)}.real_time_parameters (tenant_id, ingestion_id, {columns})"
        f" SELECT $1, $2, {columns} FROM pg_temp.wt_staging"
        " ON CONFLICT (well_id, parameter_name, ts) DO NOTHING"
    )

    async def writer(number: int, batches: list[Batch]) -> int:
        inserted = 0
        async with pool.acquire() as conn:
            for sequence, batch in enumerate(batches):
                # ON COMMIT DELETE ROWS empties the staging table at each commit.
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "wt_staging", columns=STAGING_COLUMNS, records=batch.records
                    )
                    status = await conn.execute(insert, tenant, f"ceiling_{number}_{sequence}")
                inserted += int(status.rsplit(" ", 1)[-1])
        return inserted

    started = time.perf_counter()
    counts = await asyncio.gather(*(writer(n, s) for n, s in enumerate(streams)))
    elapsed = time.perf_counter() - started
    expected = sum(b.size for s in streams for b in s)
    if sum(counts) != expected:
        raise RuntimeError(f"ceiling inserted {sum(counts)} of {expected} rows")
    return expected / elapsed


async def raw_copy_phase(pool: asyncpg.Pool, tenant: str, streams: list[list[Batch]]) -> float:
    """Points/s of a bare binary COPY of each batch straight into the partitioned table (no
    staging, no ON CONFLICT): what the database does with no de-duplication at all."""
    columns = ("tenant_id", "ingestion_id", *STAGING_COLUMNS)
    # Built before the clock starts: the tenant and ingestion id differ from the gateway's rows.
    rows = [
        [[(tenant, f"raw_{n}_{k}", *r) for r in batch.records] for k, batch in enumerate(s)]
        for n, s in enumerate(streams)
    ]

    async def writer(batches: list[list[tuple[Any, ...]]]) -> None:
        async with pool.acquire() as conn:
            for records in batches:
                await conn.copy_records_to_table(
                    "real_time_parameters",
                    schema_name=f"{tenant}_streams",
                    columns=columns,
                    records=records,
                )

    started = time.perf_counter()
    await asyncio.gather(*(writer(s) for s in rows))
    elapsed = time.perf_counter() - started
    return sum(len(r) for s in rows for r in s) / elapsed


async def count_rows(pool: asyncpg.Pool, tenant: str) -> int:
    count: int = await pool.fetchval(f"SELECT count(*) FROM {_schema(tenant)}.real_time_parameters")
    return count


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True, slots=True)
class Tenants:
    gateway: str
    ceiling: str
    raw: str

    def all(self) -> list[str]:
        return [self.gateway, self.ceiling, self.raw]


def progress(message: str) -> None:
    # Progress goes to stderr: stdout carries the table and the JSON line only.
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def _one_run(
    label: str,
    tenants: Tenants,
    workload: Workload,
    ingests: list[Any],
    pool: asyncpg.Pool,
    key: DevSigningKey,
    config: GatewayConfig,
    ceiling_first: bool,
) -> RunResult:
    token = key.mint(tenants.gateway, config.auth.audience, ttl_seconds=4 * 3600)
    result = RunResult()

    async def database_side() -> None:
        result.ceiling_pps = await ceiling_phase(pool, tenants.ceiling, workload.streams)
        result.raw_copy_pps = await raw_copy_phase(pool, tenants.raw, workload.streams)

    # Alternating which side goes first keeps a slow drift of the machine (autovacuum of the
    # previous run's tables, a checkpoint, a neighbour's job) from always hitting the same side.
    if ceiling_first:
        await database_side()
    result.gateway_pps = await gateway_phase(ingests, token, workload.streams)
    result.latencies_s, result.latency_pps = await latency_phase(ingests, token, workload.callers)
    if not ceiling_first:
        await database_side()

    # Every point stored exactly once, on both sides.
    latency_points = sum(b.size for c in workload.callers for b in c)
    expected = {
        tenants.gateway: workload.points + latency_points,
        tenants.ceiling: workload.points,
        tenants.raw: workload.points,
    }
    for tenant, rows in expected.items():
        stored = await count_rows(pool, tenant)
        if stored != rows:
            raise RuntimeError(f"{label}: {tenant} holds {stored} rows, expected {rows}")
    progress(
        f"{label}: gateway {result.gateway_pps:,.0f} pts/s, ceiling {result.ceiling_pps:,.0f}"
        f" pts/s, ratio {result.ratio:.2f}, p50 {result.percentile_ms(50):.1f} ms,"
        f" p99 {result.percentile_ms(99):.1f} ms"
    )
    return result


async def cleanup(database_url: str, redis_url: str, tenants: list[str]) -> None:
    """Drop what the benchmark created: schemas, tenant rows, audit rows and cache keys."""
    storage = await Storage.connect(database_url, StorageConfig(pool_min_size=1))
    try:
        for tenant in tenants:
            await storage.drop_tenant(tenant)
        # Audit rows outlive a dropped tenant by design; a benchmark's are only noise.
        await storage.pool.execute(
            "DELETE FROM system_monitoring.audit_log WHERE tenant_id = ANY($1)", tenants
        )
    finally:
        await storage.close()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for tenant in tenants:
            # The key's braces are a Redis Cluster hash tag, not glob syntax.
            keys = [k async for k in redis.scan_iter(match=f"realtime:{{{tenant}}}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
    finally:
        await redis.aclose()


async def benchmark(args: argparse.Namespace, database_url: str, redis_url: str) -> dict[str, Any]:
    progress("building the workload")
    workload = build_workload(args.points, args.streams, args.batch, args.latency_batches)
    warmup = Workload(
        streams=[s[: args.warmup_batches] for s in workload.streams],
        callers=[c[: max(1, args.warmup_batches // 2)] for c in workload.callers],
    )

    prefix = f"bench_{secrets.token_hex(3)}"
    labelled = {"warm-up": Tenants(f"{prefix}_wg", f"{prefix}_wc", f"{prefix}_wr")}
    for n in range(1, args.runs + 1):
        labelled[f"run {n}"] = Tenants(f"{prefix}_g{n}", f"{prefix}_c{n}", f"{prefix}_r{n}")
    all_tenants = [t for tenants in labelled.values() for t in tenants.all()]

    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-") as data_dir:
        config = gateway_config(data_dir)
        key = DevSigningKey.load_or_create(config.dev_key_file)  # before the child loads it
        try:
            async with gateway_process(
                data_dir, database_url, redis_url, all_tenants, args.gateway_profile
            ) as gateway:
                progress(f"gateway pid {gateway.pid} listening on 127.0.0.1:{gateway.port}")
                # One connection per stream, as separate agents would have; without a local
                # subchannel pool grpc would share one TCP connection between the channels.
                channels = [
                    grpc.aio.insecure_channel(
                        f"127.0.0.1:{gateway.port}", options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                    for _ in range(args.streams)
                ]
                pool = await asyncpg.create_pool(
                    database_url,
                    min_size=args.streams,
                    max_size=args.streams,
                    init=prepare_connection,  # the gateway's own staging table
                )
                try:
                    await asyncio.gather(*(c.channel_ready() for c in channels))
                    ingests = [ingest_callable(c) for c in channels]
                    for n, (label, tenants) in enumerate(labelled.items()):
                        progress(f"{label} …")
                        run = await _one_run(
                            label,
                            tenants,
                            warmup if n == 0 else workload,
                            ingests,
                            pool,
                            key,
                            config,
                            ceiling_first=n % 2 == 0,
                        )
                        if n > 0:
                            results.append(run)
                finally:
                    await pool.close()
                    await asyncio.gather(*(c.close() for c in channels))
        finally:
            progress("dropping the benchmark's tenants")
            await cleanup(database_url, redis_url, all_tenants)
    return _report(args, results, gateway_pid=gateway.pid)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _report(args: argparse.Namespace, results: list[RunResult], gateway_pid: int) -> dict[str, Any]:
    points_per_s = _median([r.gateway_pps for r in results])
    ceiling = _median([r.ceiling_pps for r in results])
    figures: dict[str, Any] = {
        "points_per_s": round(points_per_s),
        "ceiling_points_per_s": round(ceiling),
        "ratio": round(points_per_s / ceiling, 3),
        "p50_ms": round(_median([r.percentile_ms(50) for r in results]), 1),
        "p99_ms": round(_median([r.percentile_ms(99) for r in results]), 1),
        "raw_copy_points_per_s": round(_median([r.raw_copy_pps for r in results])),
        "one_batch_calls_points_per_s": round(_median([r.latency_pps for r in results])),
        "points": args.points,
        "streams": args.streams,
        "batch": args.batch,
        "latency_calls": args.latency_batches,
        "runs": len(results),
    }
    _print_table(args, results, figures, gateway_pid)
    return figures


def _print_table(
    args: argparse.Namespace,
    results: list[RunResult],
    figures: dict[str, Any],
    gateway_pid: int,
) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"WellTegra ingest gateway throughput: {args.points:,} points over {args.streams} Ingest"
        f" streams in batches of {args.batch:,}; {args.latency_batches} one-batch calls for"
        f" latency; {len(results)} runs"
    )
    print(f"machine: {os.cpu_count()} cores, load average {load}; gateway pid {gateway_pid}")
    header = (
        f"{'':8}{'gateway':>12}{'ceiling':>12}{'ratio':>7}{'raw COPY':>12}"
        f"{'1-batch':>12}{'p50':>9}{'p99':>9}"
    )
    units = f"{'':8}{'pts/s':>12}{'pts/s':>12}{'':>7}{'pts/s':>12}{'pts/s':>12}{'ms':>9}{'ms':>9}"
    print(header)
    print(units)
    for n, r in enumerate(results, start=1):
        print(
            f"{'run ' + str(n):8}{r.gateway_pps:>12,.0f}{r.ceiling_pps:>12,.0f}{r.ratio:>7.2f}"
            f"{r.raw_copy_pps:>12,.0f}{r.latency_pps:>12,.0f}"
            f"{r.percentile_ms(50):>9.1f}{r.percentile_ms(99):>9.1f}"
        )
    print(
        f"{'median':8}{figures['points_per_s']:>12,}{figures['ceiling_points_per_s']:>12,}"
        f"{figures['ratio']:>7.2f}{figures['raw_copy_points_per_s']:>12,}"
        f"{figures['one_batch_calls_points_per_s']:>12,}"
        f"{figures['p50_ms']:>9.1f}{figures['p99_ms']:>9.1f}"
    )
    print(
        "(ratio = median gateway / median ceiling; p50/p99 = medians over the runs of each"
        " run's percentiles of one-batch Ingest call latency)"
    )


# --------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def batch_size_arg(text: str) -> int:
    value = positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"the gateway takes at most {MAX_BATCH} points a batch")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--points",
        type=positive_int,
        default=200_000,
        help="points per run for the gateway and for the ceiling (default 200000)",
    )
    parser.add_argument(
        "--streams",
        type=positive_int,
        default=4,
        help="concurrent Ingest streams = ceiling connections (default 4)",
    )
    parser.add_argument(
        "--batch",
        type=batch_size_arg,
        default=1000,
        help="points per batch, at most 1000 (default 1000)",
    )
    parser.add_argument(
        "--latency-batches",
        type=positive_int,
        help="one-batch calls per run for latency (default points / batch)",
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="measured runs (default 3)")
    parser.add_argument(
        "--warmup-batches",
        type=positive_int,
        default=5,
        help="batches per stream in the warm-up (default 5)",
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--gateway-profile",
        metavar="FILE",
        help="write a cProfile of the gateway process (warm-up and runs) to FILE",
    )
    return parser


@contextlib.contextmanager
def servers(args: argparse.Namespace, data_dir: Path) -> Iterator[tuple[str, str]]:
    """The given URLs, else embedded servers from the pip wheels, as the tests do."""
    with contextlib.ExitStack() as stack:
        database_url, redis_url = args.database_url, args.redis_url
        if not database_url or not redis_url:
            from ingest_service.embedded import EmbeddedPostgres, EmbeddedRedis

            if not database_url:
                progress("no DATABASE_URL: starting an embedded PostgreSQL")
                postgres = EmbeddedPostgres(data_dir)
                stack.callback(postgres.stop)
                database_url = postgres.start()
            if not redis_url:
                progress("no REDIS_URL: starting an embedded Redis")
                redis = EmbeddedRedis(data_dir)
                stack.callback(redis.stop)
                redis_url = redis.start()
        yield database_url, redis_url


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--database-url and --redis-url, shared by every benchmark here."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL (default env DATABASE_URL, else an embedded server)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="Redis URL (default env REDIS_URL, else an embedded server)",
    )


def run_benchmark(
    benchmark_fn: Callable[[argparse.Namespace, str, str], Awaitable[dict[str, Any]]],
    args: argparse.Namespace,
) -> int:
    """Start the servers (given or embedded), run ``benchmark_fn`` and end the output with its
    figures as one line of JSON, for scripts and CI. Shared by every benchmark here."""
    logging.basicConfig(level=logging.WARNING, format="bench: %(levelname)s %(name)s: %(message)s")
    with (
        tempfile.TemporaryDirectory(prefix="wt-bench-servers-") as servers_dir,
        servers(args, Path(servers_dir)) as (database_url, redis_url),
    ):
        figures = asyncio.run(benchmark_fn(args, database_url, redis_url))
    print(json.dumps(figures), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.latency_batches is None:
        args.latency_batches = max(args.streams, args.points // args.batch)
    return run_benchmark(benchmark, args)


if __name__ == "__main__":
    sys.exit(main())
