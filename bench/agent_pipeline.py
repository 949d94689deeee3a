"""The edge agent's whole pipeline on this machine: throughput, drain, latency, memory, disk, each
beside a baseline or ceiling measured in the same run.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/agent_pipeline.py [--catch-up-points 200000] \\
        [--backlog-points 300000] [--live-seconds 15]

The agent runs as it does on a site, ``python -m edge.cli run -c FILE``, a process of its own,
and the gateway as ``python -m ingest_service.cli serve`` with its development OAuth issuer,
from which the agent gets its tokens. Each phase writes into a fresh tenant, counts the rows
stored in Postgres and fails when a point is missing; the tenants are dropped at the end.
The data are the simulator's: ``--wells`` wells × 4 parameters at ``--rate`` Hz (3 × 4 at 10 Hz,
120 points/s, by default). Phases, in order:

* **catch-up**: the agent starts with its simulator's watermark ``--catch-up-points`` points
  behind (28 minutes by default), so it replays them as fast as it can through simulator →
  transform → buffer → uploader → gateway → Postgres, then goes on live. Points/s: the backlog's
  rows over the time from the first row's commit to the last's (``ingested_at``).
* **simulator → buffer** (the catch-up's own ceiling): ``Simulator.run`` catching up
  ``--collect-points`` into a buffer in this process, with no uploader, its emits as it makes
  them.
* **agent alone** (ceiling): simulator → transform → buffer through the agent's ``SourceSink``,
  in this process with no uploader, in emits of whole batches, fills a buffer with
  ``--backlog-points`` points of the last hour. Points/s, and the buffer's bytes per point.
* **gateway alone** (ceiling): the filled buffer's batches, as the backlog lane sends them
  (historical), sent by this process over one connection in calls of
  ``api.max_batches_per_call``; then ``--probe-calls`` one-batch calls of one tick's points,
  stamped when sent, for the gateway's own latency.
* **drain**: the agent, with no data source, starts on that buffer (its batches dated an hour
  back, as after an outage) and sends it all; points/s as for the catch-up.
* **drain + live**: another buffer filled the same way; the agent starts on it with its
  simulator live: the backlog drains beside live data (at most ``api.backlog_share`` of the
  upload time while live data flow), and live points' latency is measured meanwhile.
* **live**: a fresh agent, live data only, for ``--live-seconds`` after a ``--warmup``.
* **spec table** (baseline), last, as its writes would disturb a phase after it: the drain's
  points, one row each, in the spec's ``buffered_data`` table (SPEC.md §2.4, with its two
  indexes) in a scratch SQLite file: bytes per point.

Latency is a point's timestamp (the simulator's tick instant) to its row's ``ingested_at`` (the
gateway's transaction start, a few ms before the commit) on the same machine clock, for every
live point from ``--warmup`` seconds after the agent's start on (token, connection and imports
come before). The agent's peak RSS is its ``VmHWM`` in /proc just before it is stopped.

The output is a table, then exactly one line of JSON, the last line. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import os
import re
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import yaml

# The gateway benchmark, a sibling module: run as a script, Python puts bench/ on sys.path.
from gateway_throughput import (
    add_server_arguments,
    cleanup,
    ingest_callable,
    percentile,
    positive_int,
    progress,
    run_benchmark,
)
from redis import asyncio as aioredis

from edge.agent import SourceSink, open_buffer, token_client
from edge.collectors.simulator import SIMULATED_PARAMETERS, Simulator, SimulatorConfig
from edge.config import AgentConfig, load_agent_config
from edge.metrics import AgentMetrics
from edge.readings import Reading
from edge.transform import Transform
from ingest_service.config import StorageConfig
from ingest_service.crypto import MASTER_KEY_ENV, MasterKeyProvider
from ingest_service.dev_issuer import ClientCredentials, create_client
from ingest_service.storage import Storage
from welltegra.ingest.v1 import ingest_pb2

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "sim"
# The drain's buffers are dated this far back: their batches were sealed during an outage, so
# the agent sends them on its backlog lane, as it would after one.
OUTAGE_AGE_S = 3600.0
# The filled backlog ends this long before now: no live point of the same wells overlaps it.
BACKLOG_ENDS_AGO_S = 60.0
POLL_S = 0.25
PROBE_SPACING_S = 0.02
TARGETS = {
    "drain_points_per_s": (">=", 30_000),
    "live_p99_ms": ("<", 1_000),
    "draining_p99_ms": ("<", 1_000),
    "agent_peak_rss_mb": ("<", 150),
    "buffer_bytes_per_point": ("<=", 40),
}
# In-range values in canonical units, for the gateway-alone latency probe.
_PROBE_VALUES = {
    "wellhead_pressure": 2_500.0,
    "hookload": 300.0,
    "flow_rate": 2_000.0,
    "downhole_temperature": 220.0,
}
_TICKS = os.sysconf("SC_CLK_TCK")

# The spec's buffer table (SPEC.md §2.4), verbatim: the baseline for bytes per point.
SPEC_TABLE = """
CREATE TABLE IF NOT EXISTS buffered_data (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    well_id TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    parameter_name TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    quality_code TEXT DEFAULT 'GOOD',
    source TEXT,
    created_at TEXT DEFAULT CURRENT_TIMESTAMP,
    sent_at TEXT,
    status TEXT DEFAULT 'PENDING'
);
CREATE INDEX IF NOT EXISTS idx_status ON buffered_data(status);
CREATE INDEX IF NOT EXISTS idx_timestamp ON buffered_data(timestamp);
"""
SPEC_INSERT = (
    "INSERT INTO buffered_data (tenant_id, well_id, timestamp, parameter_name, value, unit,"
    " quality_code, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


# --------------------------------------------------------------------------------------------
# CPU, from /proc


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (nan once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICKS


@dataclass(slots=True)
class CpuWatch:
    """Cores busy over a phase: the agent, the gateway and the whole machine."""

    pids: dict[str, int]
    wall: float = field(default_factory=time.perf_counter)
    start: dict[str, float] = field(default_factory=dict)
    cores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start = {name: _process_cpu_s(pid) for name, pid in self.pids.items()}
        self.start["machine"] = _machine_busy_s()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        now = {name: _process_cpu_s(pid) for name, pid in self.pids.items()}
        now["machine"] = _machine_busy_s()
        self.cores = {name: (now[name] - self.start[name]) / wall for name in now}
        return self.cores


# --------------------------------------------------------------------------------------------
# The gateway: `welltegra-ingest serve` with its development OAuth issuer, a process of its own


@dataclass(frozen=True, slots=True)
class GatewayServer:
    pid: int
    target: str
    token_url: str


_SERVING = re.compile(r"serving gRPC on (\S+)")
_ISSUER = re.compile(r"serving the development OAuth issuer on (\S+)")


def _gateway_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "grpc_listen": "127.0.0.1:0",
                "data_dir": str(directory / "data"),
                "dev_issuer": {"enabled": True, "listen": "127.0.0.1:0"},
                # Limits stay on, as in production, far above what is sent: their cost is
                # measured, not their effect.
                "limits": {"requests_per_minute": 10_000_000, "bytes_per_day": 10**15},
            }
        )
    )
    return config


@contextlib.asynccontextmanager
async def gateway_server(
    directory: Path, database_url: str, redis_url: str, master_key: bytes
) -> AsyncIterator[GatewayServer]:
    """``python -m ingest_service.cli serve`` on free loopback ports, stopped with SIGTERM."""
    config = _gateway_config(directory)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        MASTER_KEY_ENV: base64.b64encode(master_key).decode(),
    }
    log_path = directory / "gateway.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingest_service.cli", "serve", "--config", str(config),
            env=env, cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            text = log_path.read_text(errors="replace")
            serving, issuer = _SERVING.search(text), _ISSUER.search(text)
            if serving and issuer:
                break
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{text[-3000:]}")
            await asyncio.sleep(0.1)
        yield GatewayServer(process.pid, serving[1], issuer[1] + "/oauth/token")
    finally:
        await _stop_process(process, 30)


async def _stop_process(process: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM to our own child, by its handle; SIGKILL if it does not stop in time."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


# --------------------------------------------------------------------------------------------
# The agent: `welltegra-agent run -c FILE`, a process of its own


@dataclass(slots=True)
class AgentProcess:
    process: asyncio.subprocess.Process
    directory: Path
    started: float  # time.time() when it was spawned

    @classmethod
    async def start(cls, config: Path) -> AgentProcess:
        with (config.parent / "agent.out").open("ab") as log:
            started = time.time()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge.cli", "run", "-c", str(config),
                cwd=ROOT, stdout=log, stderr=log,
            )  # fmt: skip
        return cls(process, config.parent, started)

    def peak_rss_mb(self) -> float:
        """The process's peak resident set so far (VmHWM), in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(found[1]) / 1024 if found else float("nan")

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(
                f"the agent exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self) -> str:
        path = self.directory / "agent.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def stop(self) -> None:
        await _stop_process(self.process, 30)


# --------------------------------------------------------------------------------------------
# Configuration, tenants, stored rows


def simulator_source(wells: int, rate: float, backfill_s: float = 3600.0) -> dict[str, Any]:
    """The ``data_sources`` entry of the simulated wells (no impossible values: the gateway
    would quarantine them and the counts would not add up)."""
    return {
        "name": SOURCE,
        "type": "simulator",
        "wells": [f"WELL-{n:03d}" for n in range(1, wells + 1)],
        "rate": rate,
        "seed": 1,
        "out_of_range_ratio": 0,
        "backfill_limit": math.ceil(backfill_s),
    }


def write_agent_config(
    directory: Path,
    tenant: str,
    gateway: GatewayServer,
    client: ClientCredentials,
    source: dict[str, Any] | None,
) -> Path:
    """An agent configuration with the product's defaults but for the gateway, the client,
    the source, and local paths and free ports."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.yaml"
    config = {
        "tenant": {"id": tenant},
        "api": {"grpc_target": gateway.target, "tls": {"enabled": False}},
        "oauth": {
            "token_url": gateway.token_url,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
        "data_sources": [] if source is None else [source],
        "buffer": {"database_path": str(directory / "buffer.db")},
        "logging": {"file": str(directory / "agent.log")},
        "monitoring": {"health_check_port": 0, "prometheus_metrics_port": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _table(tenant: str, name: str) -> str:
    # Tenant ids match ^[a-z][a-z0-9_]{1,47}$: quoting is enough.
    return f'"{tenant}_streams".{name}'


@dataclass(frozen=True, slots=True)
class Stored:
    """Rows of a time range: how many, and when the first and last were committed."""

    count: int
    first_commit: float  # Unix time of min(ingested_at)
    last_commit: float

    @property
    def points_per_s(self) -> float:
        span = self.last_commit - self.first_commit
        return self.count / span if span > 0 else float("nan")


async def stored(pool: asyncpg.Pool, tenant: str, first: datetime, last: datetime) -> Stored:
    row = await pool.fetchrow(
        "SELECT count(*), extract(epoch FROM min(ingested_at))::float8,"
        " extract(epoch FROM max(ingested_at))::float8"
        f" FROM {_table(tenant, 'real_time_parameters')} WHERE ts BETWEEN $1 AND $2",
        first,
        last,
    )
    assert row is not None
    return Stored(row[0], row[1] or float("nan"), row[2] or float("nan"))


async def ledger_points(pool: asyncpg.Pool, tenant: str) -> int:
    """Points of the tenant's committed batches: a cheap count to poll while rows pour in."""
    total: int = await pool.fetchval(
        f"SELECT coalesce(sum(accepted_count), 0) FROM {_table(tenant, 'batch_ledger')}"
    )
    return total


async def latencies_s(
    pool: asyncpg.Pool, tenant: str, first: datetime, last: datetime
) -> list[float]:
    rows = await pool.fetch(
        f"SELECT extract(epoch FROM ingested_at - ts)::float8"
        f" FROM {_table(tenant, 'real_time_parameters')} WHERE ts BETWEEN $1 AND $2",
        first,
        last,
    )
    return [r[0] for r in rows]


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, agent: AgentProcess
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        agent.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done within {timeout:.0f} s\n{agent.log_tail()}")
        await asyncio.sleep(POLL_S)


def first_tick_at_or_after(simulator: Simulator, instant: datetime) -> int:
    tick = simulator.tick_of(instant)
    return tick if simulator.tick_time(tick) >= instant else tick + 1


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class Fill:
    """A buffer filled in this process: the agent-alone ceiling and the bytes per point."""

    config: Path
    points: int
    first_tick: int
    last_tick: int
    points_per_s: float
    bytes_per_point: float  # BufferStats.bytes_per_point: used pages / points
    file_bytes_per_point: float  # database + WAL file, as they stand after the fill
    payloads: list[bytes]  # the sealed batches, decompressed


@dataclass(slots=True)
class AgentRun:
    """What one agent process did in a phase."""

    points: int = 0  # backlog points stored (catch-up, drains)
    stored: Stored | None = None
    from_start_s: float = float("nan")  # agent spawned → last backlog row committed
    startup_s: float = float("nan")  # agent spawned → first backlog row committed
    latencies_s: list[float] = field(default_factory=list)  # live points
    peak_rss_mb: float = float("nan")
    cores: dict[str, float] = field(default_factory=dict)

    @property
    def points_per_s(self) -> float:
        return self.stored.points_per_s if self.stored else float("nan")

    @property
    def from_start_points_per_s(self) -> float:
        return self.points / self.from_start_s if self.from_start_s > 0 else float("nan")

    def ms(self, q: int) -> float:
        return percentile(self.latencies_s, q) * 1000 if self.latencies_s else float("nan")


@dataclass(slots=True)
class GatewayAlone:
    stored: Stored  # the batches' rows: points/s counted as for the agent's phases
    wall_points_per_s: float  # first call's start to the last response, as the sender saw it
    cores: dict[str, float]
    latencies_s: list[float]

    @property
    def points_per_s(self) -> float:
        return self.stored.points_per_s

    def ms(self, q: int) -> float:
        return percentile(self.latencies_s, q) * 1000 if self.latencies_s else float("nan")


# --------------------------------------------------------------------------------------------
# The phases


@dataclass(slots=True)
class Bench:
    args: argparse.Namespace
    work: Path
    gateway: GatewayServer
    pool: asyncpg.Pool
    clients: dict[str, ClientCredentials]

    def source(self, backfill_s: float = 3600.0) -> dict[str, Any]:
        return simulator_source(self.args.wells, self.args.rate, backfill_s)

    def config(self, phase: str, tenant: str, source: dict[str, Any] | None) -> Path:
        return write_agent_config(
            self.work / phase, tenant, self.gateway, self.clients[tenant], source
        )

    def watch(self, agent: AgentProcess | None = None) -> CpuWatch:
        pids = {"gateway": self.gateway.pid}
        if agent is not None:
            pids["agent"] = agent.process.pid
        return CpuWatch(pids)

    async def catch_up(self, tenant: str) -> AgentRun:
        """The agent replays ``--catch-up-points`` from an old watermark, then goes live."""
        simulator = Simulator(SimulatorConfig.model_validate(self.source()))
        ticks: int = math.ceil(self.args.catch_up_points / simulator.series_count)
        source = self.source(backfill_s=ticks / self.args.rate + 600)
        path = self.config("catch-up", tenant, source)
        config = load_agent_config(path)
        watermark = simulator.tick_of(datetime.now(UTC)) - ticks
        buffer = await open_buffer(config)
        try:
            await buffer.append(SOURCE, [], {"tick": str(watermark)})
        finally:
            await buffer.close()

        agent = await AgentProcess.start(path)
        run = AgentRun()
        try:
            cpu = self.watch(agent)
            # The backlog: every tick from the watermark to the agent's start.
            first = simulator.tick_time(watermark + 1)
            last = simulator.tick_time(simulator.tick_of(utc(agent.started)))
            expected = (simulator.tick_of(last) - watermark) * simulator.series_count

            async def caught_up() -> bool:
                if await ledger_points(self.pool, tenant) < expected:
                    return False
                found = run.stored = await stored(self.pool, tenant, first, last)
                return found.count >= expected

            await wait_until(caught_up, 120 + expected / 1000, "catch-up", agent)
            run.cores = cpu.stop()
            run.peak_rss_mb = agent.peak_rss_mb()
        finally:
            await agent.stop()
        assert run.stored is not None
        if run.stored.count != expected:
            raise RuntimeError(f"catch-up: {run.stored.count} rows stored, expected {expected}")
        run.points = expected
        run.from_start_s = run.stored.last_commit - agent.started
        run.startup_s = run.stored.first_commit - agent.started
        return run

    async def simulator_run(self, tenant: str) -> float:
        """Points/s of ``Simulator.run`` catching up into a buffer, in this process with no
        uploader: the catch-up's own ceiling, its emits as the collector makes them."""
        source = self.source()
        simulator = Simulator(SimulatorConfig.model_validate(source))
        ticks: int = math.ceil(self.args.collect_points / simulator.series_count)
        source = self.source(backfill_s=ticks / self.args.rate + 600)
        config = load_agent_config(self.config("simulator-run", tenant, source))
        collector = Simulator(SimulatorConfig.model_validate(source))
        watermark = collector.tick_of(datetime.now(UTC)) - ticks
        buffer = await open_buffer(config)
        try:
            await buffer.append(SOURCE, [], {"tick": str(watermark)})
            sink = _CountingSink(
                SourceSink(
                    SOURCE, Transform(config.registry(), SOURCE), buffer,
                    AgentMetrics(config.tenant.id),
                ),
                ticks * collector.series_count,
            )  # fmt: skip
            started = time.perf_counter()
            task = asyncio.create_task(collector.run(sink))
            try:
                await asyncio.wait_for(sink.done.wait(), 60 + ticks / 100)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return sink.count / (sink.finished - started)
        finally:
            await buffer.close()

    async def fill(self, phase: str, tenant: str, live: bool) -> Fill:
        """Fill a buffer through ``SourceSink`` (transform, then buffer) with
        ``--backlog-points`` of the simulator's points that end a minute ago."""
        source = self.source()
        path = self.config(phase, tenant, source if live else None)
        config = load_agent_config(path)
        simulator = Simulator(SimulatorConfig.model_validate(source))
        ticks: int = math.ceil(self.args.backlog_points / simulator.series_count)
        last_tick = simulator.tick_of(utc(time.time() - BACKLOG_ENDS_AGO_S))
        first_tick = last_tick - ticks + 1
        fill = await fill_buffer(config, simulator, first_tick, last_tick)
        fill.config = path
        # As if sealed during an outage: the agent sends them on its backlog lane.
        await asyncio.to_thread(_backdate, config.buffer.database_path, OUTAGE_AGE_S)
        return fill

    async def gateway_alone(self, tenant: str, fill: Fill) -> GatewayAlone:
        """The filled buffer's batches, as the backlog lane sends them (historical), in calls
        of ``max_batches_per_call`` over one connection; then one-batch calls of one tick."""
        config = load_agent_config(self.config("gateway-alone", tenant, None))
        # Appended, these fields override the batch's own: protobuf merges concatenations.
        suffix = ingest_pb2.IngestRequest(tenant_id=tenant, historical=True).SerializeToString()
        requests = [payload + suffix for payload in fill.payloads]
        per_call = config.api.max_batches_per_call
        tokens = token_client(config)
        compression = (
            grpc.Compression.Gzip
            if config.api.compression == "gzip"
            else grpc.Compression.NoCompression
        )
        try:
            token = await tokens.token()
            metadata = (("authorization", f"Bearer {token}"),)
            async with grpc.aio.insecure_channel(
                self.gateway.target, compression=compression
            ) as channel:
                await channel.channel_ready()
                ingest = ingest_callable(channel)
                cpu = self.watch()
                started = time.perf_counter()
                accepted = 0
                for start in range(0, len(requests), per_call):
                    call = ingest(metadata=metadata)
                    for request in requests[start : start + per_call]:
                        await call.write(request)
                    await call.done_writing()
                    response: ingest_pb2.IngestResponse = await call
                    accepted += response.accepted_count
                elapsed = time.perf_counter() - started
                cores = cpu.stop()
                if accepted != fill.points:
                    raise RuntimeError(f"gateway alone: {accepted} of {fill.points} accepted")
                first, last = await self._latency_probe(ingest, metadata, tenant)
        finally:
            await tokens.aclose()
        simulator = Simulator(SimulatorConfig.model_validate(self.source()))
        rows = await stored(
            self.pool,
            tenant,
            simulator.tick_time(fill.first_tick),
            simulator.tick_time(fill.last_tick),
        )
        if rows.count != fill.points:
            raise RuntimeError(f"gateway alone: {rows.count} rows stored, expected {fill.points}")
        return GatewayAlone(
            rows, fill.points / elapsed, cores, await latencies_s(self.pool, tenant, first, last)
        )

    async def _latency_probe(
        self, ingest: Any, metadata: Any, tenant: str
    ) -> tuple[datetime, datetime]:
        """``--probe-calls`` one-batch calls of one tick of the live wells, each stamped with
        the instant it is sent; the time range they cover."""
        wells = simulator_source(self.args.wells, self.args.rate)["wells"]
        first = datetime.now(UTC)
        for sequence in range(1, self.args.probe_calls + 1):
            now = datetime.now(UTC)
            request = ingest_pb2.IngestRequest(
                tenant_id=tenant, agent_id="bench-probe", batch_sequence=sequence
            )
            for well in wells:
                for name, unit in SIMULATED_PARAMETERS.items():
                    point = request.data_points.add(
                        well_id=well,
                        parameter_name=name,
                        value=_PROBE_VALUES[name],
                        unit=unit,
                        quality_code="GOOD",
                        source="bench-probe",
                    )
                    point.timestamp.FromDatetime(now)
            call = ingest(metadata=metadata)
            await call.write(request.SerializeToString())
            await call.done_writing()
            await call
            await asyncio.sleep(PROBE_SPACING_S)
        return first, datetime.now(UTC)

    async def drain(self, tenant: str, fill: Fill, live: bool) -> AgentRun:
        """The agent sends the filled buffer; with ``live`` its simulator runs meanwhile."""
        simulator = Simulator(SimulatorConfig.model_validate(self.source()))
        first = simulator.tick_time(fill.first_tick)
        last = simulator.tick_time(fill.last_tick)
        agent = await AgentProcess.start(fill.config)
        run = AgentRun(points=fill.points)
        try:
            cpu = self.watch(agent)

            async def drained() -> bool:
                if await ledger_points(self.pool, tenant) < fill.points:
                    return False
                found = run.stored = await stored(self.pool, tenant, first, last)
                return found.count >= fill.points

            await wait_until(drained, 120 + fill.points / 1000, "drain", agent)
            run.cores = cpu.stop()
            assert run.stored is not None
            if live:
                # Live points read while the backlog drained, once all are stored.
                run.latencies_s = await self._live_latencies(
                    agent, tenant, simulator, run.stored.last_commit
                )
            run.peak_rss_mb = agent.peak_rss_mb()
        finally:
            await agent.stop()
        if run.stored.count != fill.points:
            raise RuntimeError(f"drain: {run.stored.count} rows stored, expected {fill.points}")
        run.from_start_s = run.stored.last_commit - agent.started
        run.startup_s = run.stored.first_commit - agent.started
        return run

    async def live(self, tenant: str) -> AgentRun:
        """A fresh agent with live data only, for ``--live-seconds`` after the warm-up."""
        path = self.config("live", tenant, self.source())
        simulator = Simulator(SimulatorConfig.model_validate(self.source()))
        agent = await AgentProcess.start(path)
        run = AgentRun()
        try:
            cpu = self.watch(agent)
            end = agent.started + self.args.warmup + self.args.live_seconds
            while time.time() < end:
                agent.check_alive()
                await asyncio.sleep(min(1.0, max(end - time.time(), 0.01)))
            run.cores = cpu.stop()
            run.latencies_s = await self._live_latencies(agent, tenant, simulator, end)
            run.peak_rss_mb = agent.peak_rss_mb()
        finally:
            await agent.stop()
        return run

    async def _live_latencies(
        self, agent: AgentProcess, tenant: str, simulator: Simulator, until: float
    ) -> list[float]:
        """Latencies of every live point from the warm-up's end to ``until``, once all of them
        are stored (so the slowest are not left out)."""
        start = agent.started + self.args.warmup
        if until <= start:
            return []
        first_tick = first_tick_at_or_after(simulator, utc(start))
        last_tick = simulator.tick_of(utc(until))
        if last_tick < first_tick:
            return []
        first, last = simulator.tick_time(first_tick), simulator.tick_time(last_tick)
        expected = (last_tick - first_tick + 1) * simulator.series_count

        async def all_stored() -> bool:
            return (await stored(self.pool, tenant, first, last)).count >= expected

        await wait_until(all_stored, 60, "live points", agent)
        samples = await latencies_s(self.pool, tenant, first, last)
        if len(samples) != expected:
            raise RuntimeError(f"live: {len(samples)} points stored, expected {expected}")
        return samples


class _CountingSink:
    """A ``ReadingSink`` that counts what reached the buffer, and says when ``target`` did."""

    def __init__(self, sink: SourceSink, target: int) -> None:
        self._sink = sink
        self._target = target
        self.count = 0
        self.finished = 0.0
        self.done = asyncio.Event()

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        await self._sink.emit(readings, watermarks)
        self.count += len(readings)
        if self.count >= self._target and not self.done.is_set():
            self.finished = time.perf_counter()
            self.done.set()

    async def watermark(self, key: str) -> str | None:
        return await self._sink.watermark(key)


async def fill_buffer(
    config: AgentConfig, simulator: Simulator, first_tick: int, last_tick: int
) -> Fill:
    """Ticks ``first_tick``..``last_tick`` through transform and buffer, as the agent's
    ``SourceSink`` takes them; emits hold whole batches, so none waits for the linger."""
    size = config.buffer.batch_max_points
    per_emit = size // math.gcd(size, simulator.series_count)
    buffer = await open_buffer(config)
    try:
        sink = SourceSink(
            SOURCE, Transform(config.registry(), SOURCE), buffer, AgentMetrics(config.tenant.id)
        )
        started = time.perf_counter()
        for tick in range(first_tick, last_tick + 1, per_emit):
            end = min(tick + per_emit, last_tick + 1)
            await sink.emit([r for t in range(tick, end) for r in simulator.readings_at(t)])
        await buffer.flush()
        elapsed = time.perf_counter() - started
        stats = await buffer.stats()
        batches = await buffer.pending(limit=stats.pending_batches)
    finally:
        await buffer.close()
    points = (last_tick - first_tick + 1) * simulator.series_count
    if stats.pending_points != points:
        raise RuntimeError(f"fill: the buffer holds {stats.pending_points} points, not {points}")
    return Fill(
        config=Path(),
        points=points,
        first_tick=first_tick,
        last_tick=last_tick,
        points_per_s=points / elapsed,
        bytes_per_point=stats.bytes_per_point or float("nan"),
        file_bytes_per_point=stats.file_bytes / points,
        payloads=[b.payload for b in batches],
    )


def _backdate(path: Path, seconds: float) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE batches SET sealed_at = sealed_at - ?", (seconds,))


def spec_table_bytes_per_point(path: Path, tenant: str, payloads: Sequence[bytes]) -> float:
    """The same points, one row each, in the spec's table in a fresh SQLite file."""

    def rows() -> Any:
        for payload in payloads:
            for p in ingest_pb2.IngestRequest.FromString(payload).data_points:
                instant = p.timestamp.ToDatetime(tzinfo=UTC)
                yield (tenant, p.well_id, instant.isoformat(), p.parameter_name, p.value,
                       p.unit, p.quality_code, p.source)  # fmt: skip

    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(SPEC_TABLE)
        with conn:
            conn.executemany(SPEC_INSERT, rows())
        (points,) = conn.execute("SELECT count(*) FROM buffered_data").fetchone()
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    return float((pages - free) * size / points)


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True, slots=True)
class Tenants:
    catch_up: str
    gateway: str
    drain: str
    draining: str
    live: str

    @classmethod
    def fresh(cls) -> Tenants:
        prefix = f"bench_{secrets.token_hex(3)}"
        return cls(*(f"{prefix}_{n}" for n in ("catchup", "gateway", "drain", "draining", "live")))

    def all(self) -> list[str]:
        return [self.catch_up, self.gateway, self.drain, self.draining, self.live]


@dataclass(slots=True)
class Results:
    catch_up: AgentRun
    simulator_run_points_per_s: float
    fill: Fill
    spec_bytes_per_point: float
    gateway: GatewayAlone
    drain: AgentRun
    draining_fill: Fill
    draining: AgentRun
    live: AgentRun


async def _drop_limit_keys(redis_url: str, tenants: list[str]) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for tenant in tenants:
            keys = [k async for k in redis.scan_iter(match=f"limits:{{{tenant}}}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
    finally:
        await redis.aclose()


async def benchmark(args: argparse.Namespace, database_url: str, redis_url: str) -> dict[str, Any]:
    tenants = Tenants.fresh()
    master_key = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="wt-bench-agent-") as work_dir:
        work = Path(work_dir)
        storage = await Storage.connect(
            database_url, StorageConfig(pool_min_size=1), MasterKeyProvider(master_key)
        )
        try:
            progress(f"creating tenants {', '.join(tenants.all())} and their OAuth clients")
            clients = {}
            for tenant in tenants.all():
                await storage.create_tenant(tenant)
                clients[tenant] = await create_client(storage.pool, tenant)
            async with gateway_server(
                work / "gateway", database_url, redis_url, master_key
            ) as gateway:
                progress(f"gateway pid {gateway.pid} on {gateway.target}")
                results = await _phases(Bench(args, work, gateway, storage.pool, clients), tenants)
        finally:
            await storage.close()
            progress("dropping the benchmark's tenants")
            await cleanup(database_url, redis_url, tenants.all())
            await _drop_limit_keys(redis_url, tenants.all())
    return report(args, results)


async def _phases(bench: Bench, tenants: Tenants) -> Results:
    args = bench.args
    progress(f"catch-up of {args.catch_up_points:,} points …")
    catch_up = await bench.catch_up(tenants.catch_up)
    progress(f"catch-up: {catch_up.points_per_s:,.0f} pts/s")
    progress(f"simulator → buffer: catching up {args.collect_points:,} points, no uploader …")
    simulator_run = await bench.simulator_run(tenants.catch_up)
    progress(f"simulator → buffer: {simulator_run:,.0f} pts/s")

    progress(f"agent alone: filling a buffer with {args.backlog_points:,} points …")
    fill = await bench.fill("drain", tenants.drain, live=False)
    progress(f"agent alone: {fill.points_per_s:,.0f} pts/s, {fill.bytes_per_point:.1f} B/point")

    progress("gateway alone …")
    gateway = await bench.gateway_alone(tenants.gateway, fill)
    progress(f"gateway alone: {gateway.points_per_s:,.0f} pts/s, p99 {gateway.ms(99):.1f} ms")

    progress("drain …")
    drain = await bench.drain(tenants.drain, fill, live=False)
    progress(f"drain: {drain.points_per_s:,.0f} pts/s")

    progress("drain + live: filling another buffer …")
    draining_fill = await bench.fill("draining", tenants.draining, live=True)
    draining_fill.payloads.clear()
    progress("drain + live …")
    draining = await bench.drain(tenants.draining, draining_fill, live=True)
    progress(f"drain + live: {draining.points_per_s:,.0f} pts/s, p99 {draining.ms(99):.0f} ms")

    progress(f"live for {args.warmup + args.live_seconds:g} s …")
    live = await bench.live(tenants.live)
    progress(f"live: p50 {live.ms(50):.0f} ms, p99 {live.ms(99):.0f} ms")

    # Last, so that the spec table's ~70 MB of writes cannot disturb a timed phase.
    spec = await asyncio.to_thread(
        spec_table_bytes_per_point, bench.work / "spec.db", tenants.drain, fill.payloads
    )
    progress(f"spec table: {spec:.1f} B/point")
    fill.payloads.clear()
    return Results(
        catch_up, simulator_run, fill, spec, gateway, drain, draining_fill, draining, live
    )


# --------------------------------------------------------------------------------------------
# Report


def _figure(value: float, digits: int = 0) -> float | int | None:
    """A figure for the JSON line: rounded, or None when it could not be measured."""
    if math.isnan(value):
        return None
    return round(value) if digits == 0 else round(value, digits)


def _text(value: float | int | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(args: argparse.Namespace, r: Results) -> dict[str, Any]:
    runs = (r.catch_up, r.drain, r.draining, r.live)
    figures: dict[str, Any] = {
        "catch_up_points_per_s": _figure(r.catch_up.points_per_s),
        "catch_up_from_start_points_per_s": _figure(r.catch_up.from_start_points_per_s),
        "simulator_run_points_per_s": _figure(r.simulator_run_points_per_s),
        "agent_alone_points_per_s": _figure(r.fill.points_per_s),
        "gateway_alone_points_per_s": _figure(r.gateway.points_per_s),
        "gateway_alone_wall_points_per_s": _figure(r.gateway.wall_points_per_s),
        "catch_up_ratio": _figure(_ratio(r.catch_up.points_per_s, r.gateway.points_per_s), 3),
        "drain_points_per_s": _figure(r.drain.points_per_s),
        "drain_from_start_points_per_s": _figure(r.drain.from_start_points_per_s),
        "drain_ratio": _figure(_ratio(r.drain.points_per_s, r.gateway.points_per_s), 3),
        "draining_points_per_s": _figure(r.draining.points_per_s),
        "live_p50_ms": _figure(r.live.ms(50), 1),
        "live_p99_ms": _figure(r.live.ms(99), 1),
        "draining_p50_ms": _figure(r.draining.ms(50), 1),
        "draining_p99_ms": _figure(r.draining.ms(99), 1),
        "gateway_alone_p50_ms": _figure(r.gateway.ms(50), 1),
        "gateway_alone_p99_ms": _figure(r.gateway.ms(99), 1),
        "agent_peak_rss_mb": _figure(max(run.peak_rss_mb for run in runs), 1),
        "catch_up_rss_mb": _figure(r.catch_up.peak_rss_mb, 1),
        "drain_rss_mb": _figure(r.drain.peak_rss_mb, 1),
        "draining_rss_mb": _figure(r.draining.peak_rss_mb, 1),
        "live_rss_mb": _figure(r.live.peak_rss_mb, 1),
        "agent_startup_s": _figure(r.drain.startup_s, 2),
        "buffer_bytes_per_point": _figure(r.fill.bytes_per_point, 1),
        "buffer_file_bytes_per_point": _figure(r.fill.file_bytes_per_point, 1),
        "spec_table_bytes_per_point": _figure(r.spec_bytes_per_point, 1),
        "catch_up_points": r.catch_up.points,
        "backlog_points": r.fill.points,
        "live_points": len(r.live.latencies_s),
        "draining_live_points": len(r.draining.latencies_s),
        "wells": args.wells,
        "rate_hz": args.rate,
    }
    figures["targets_missed"] = [
        name
        for name, (op, bound) in TARGETS.items()
        if figures[name] is not None and not _met(figures[name], op, bound)
    ]
    figures["targets_not_measured"] = [name for name in TARGETS if figures[name] is None]
    _print_table(args, r, figures)
    return figures


def _met(value: float, op: str, bound: float) -> bool:
    return {"<": value < bound, "<=": value <= bound, ">=": value >= bound}[op]


def _print_table(args: argparse.Namespace, r: Results, figures: dict[str, Any]) -> None:
    f = figures
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"WellTegra edge agent pipeline: simulator of {args.wells} wells ×"
        f" {len(SIMULATED_PARAMETERS)} parameters at {args.rate:g} Hz"
        f" ({args.wells * len(SIMULATED_PARAMETERS) * args.rate:g} points/s live);"
        f" catch-up {f['catch_up_points']:,} points, backlogs {f['backlog_points']:,} points"
    )
    print(f"machine: {os.cpu_count()} cores, load average {load}")
    print()

    def target(name: str) -> str:
        op, bound = TARGETS[name]
        if name in f["targets_not_measured"]:
            verdict = "not measured"
        else:
            verdict = "MISSED" if name in f["targets_missed"] else "ok"
        return f"{op} {bound:,} {verdict}"

    def pair(a: str, b: str, spec: str = ".0f") -> str:
        return f"{_text(f[a], spec)} / {_text(f[b], spec)}"

    rows = [
        ("catch-up, pts/s", _text(f["catch_up_points_per_s"]),
         f"gateway alone {_text(f['gateway_alone_points_per_s'])}"
         f" (×{_text(f['catch_up_ratio'], '.2f')}); agent alone"
         f" {_text(f['agent_alone_points_per_s'])}", ""),
        ("  from agent start", _text(f["catch_up_from_start_points_per_s"]),
         f"simulator → buffer as it emits {_text(f['simulator_run_points_per_s'])}", ""),
        ("drain, pts/s", _text(f["drain_points_per_s"]),
         f"gateway alone {_text(f['gateway_alone_points_per_s'])}"
         f" (×{_text(f['drain_ratio'], '.2f')})", target("drain_points_per_s")),
        ("  from agent start", _text(f["drain_from_start_points_per_s"]),
         f"agent start-up {_text(f['agent_startup_s'], '.1f')} s", ""),
        ("drain beside live, pts/s", _text(f["draining_points_per_s"]),
         "backlog lane paced to api.backlog_share", ""),
        ("live p50 / p99, ms", pair("live_p50_ms", "live_p99_ms"),
         f"gateway alone {pair('gateway_alone_p50_ms', 'gateway_alone_p99_ms', '.1f')}",
         target("live_p99_ms")),
        ("  while draining", pair("draining_p50_ms", "draining_p99_ms"), "",
         target("draining_p99_ms")),
        ("agent peak RSS, MiB", _text(f["agent_peak_rss_mb"], ".1f"),
         f"catch-up {_text(f['catch_up_rss_mb'])}, drain {_text(f['drain_rss_mb'])},"
         f" drain+live {_text(f['draining_rss_mb'])}, live {_text(f['live_rss_mb'])}",
         target("agent_peak_rss_mb")),
        ("buffer bytes/point", _text(f["buffer_bytes_per_point"], ".1f"),
         f"spec table {_text(f['spec_table_bytes_per_point'], '.1f')}; file with WAL"
         f" {_text(f['buffer_file_bytes_per_point'], '.1f')}", target("buffer_bytes_per_point")),
    ]  # fmt: skip
    print(f"{'figure':<26}{'measured':>11}  {'beside it':<56}target")
    for name, value, beside, goal in rows:
        print(f"{name:<26}{value:>11}  {beside:<56}{goal}")
    print()
    print(f"{'cores busy':<26}{'agent':>8}{'gateway':>9}{'machine':>9}")
    for name, cores in (
        ("catch-up", r.catch_up.cores),
        ("gateway alone", r.gateway.cores),
        ("drain", r.drain.cores),
        ("drain + live", r.draining.cores),
        ("live", r.live.cores),
    ):
        agent = f"{cores['agent']:.2f}" if "agent" in cores else "-"
        print(f"{name:<26}{agent:>8}{cores['gateway']:>9.2f}{cores['machine']:>9.2f}")
    print(
        "(pts/s: stored rows over first to last commit; latency: point timestamp to its row's"
        f" ingested_at, live points from {args.warmup:g} s after the agent's start;"
        f" {f['live_points']:,} live and {f['draining_live_points']:,} draining samples)"
    )


# --------------------------------------------------------------------------------------------
# Command line


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--catch-up-points",
        type=positive_int,
        default=200_000,
        help="points behind the watermark in the catch-up phase (default 200000)",
    )
    parser.add_argument(
        "--collect-points",
        type=positive_int,
        default=60_000,
        help="points the simulator catches up into a buffer with no uploader (default 60000)",
    )
    parser.add_argument(
        "--backlog-points",
        type=positive_int,
        default=300_000,
        help="points in each pre-filled backlog, for the drains (default 300000)",
    )
    parser.add_argument(
        "--live-seconds",
        type=positive_float,
        default=15.0,
        help="seconds of live data measured in the live phase (default 15)",
    )
    parser.add_argument(
        "--warmup",
        type=positive_float,
        default=3.0,
        help="seconds after an agent's start before its live points count (default 3)",
    )
    parser.add_argument("--wells", type=positive_int, default=3, help="simulated wells (default 3)")
    parser.add_argument(
        "--rate",
        type=positive_float,
        default=10.0,
        help="readings per second per tag (default 10)",
    )
    parser.add_argument(
        "--probe-calls",
        type=positive_int,
        default=50,
        help="one-batch calls timed for the gateway-alone latency (default 50)",
    )
    add_server_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(benchmark, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
