"""REST through Envoy beside native gRPC, measured in the same run against the same gateway.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/rest_throughput.py [--points 100000] [--clients 4] [--batch 1000]

One gateway runs in its own process (as in bench/gateway_throughput.py, whose functions this
script reuses) and one Envoy in another (``EnvoyFront``: the production envoy/envoy.yaml with TLS
1.3 and REST→gRPC transcoding). Each of the (default 3) runs writes, into fresh tenants:

* **REST**: ``--points`` points as ``POST /v1/ingest/realtime`` requests of ``--batch`` points
  each, sent by ``--clients`` concurrent clients, each one request after the other over its own
  TLS 1.3 HTTP/1.1 keep-alive connection to Envoy, which transcodes the JSON into a unary
  ``IngestRealtime`` gRPC call to the gateway. Points/s is the points over the wall time from the
  first request to the last response; latency is each request's start to its response (sent
  after the batch is committed). The bodies are serialised before the clock starts.
* **gRPC**: the native benchmark's two phases straight to the gateway's port, with as many
  streams/callers as REST clients: ``--points`` points as client streams of many batches
  (bench/gateway_throughput.py's ``points_per_s``, the native figure), then one-batch ``Ingest``
  calls (its p50/p99, and the points/s of one call per batch, as REST has to send them).

Which protocol goes first alternates from run to run; every point must be stored exactly once
(the rows are counted after each run) and the figures are medians over the runs. While each phase
runs, the CPU time of the gateway, Envoy, this client, PostgreSQL and Redis is read from /proc, to
show where the time goes.

The output is a human-readable table followed by exactly one line of JSON, the last line:
``{"rest_points_per_s": …, "grpc_points_per_s": …, "ratio": …, "rest_p50_ms": …, …}``.
See bench/README.md for how to read each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx

# The native benchmark, a sibling module: run as a script, Python puts bench/ on sys.path.
from gateway_throughput import (
    Batch,
    Workload,
    add_server_arguments,
    batch_size_arg,
    build_workload,
    cleanup,
    count_rows,
    gateway_config,
    gateway_phase,
    gateway_process,
    ingest_callable,
    latency_phase,
    percentile,
    positive_int,
    progress,
    run_benchmark,
)

from ingest_service.devkeys import DevSigningKey
from ingest_service.envoy_front import EnvoyFront
from welltegra.ingest.v1 import ingest_pb2

REST_PATH = "/v1/ingest/realtime"
_ENVOY_READY_SECONDS = 30.0  # Envoy answers 503 until its first health check of the gateway

# --------------------------------------------------------------------------------------------
# The REST workload: the same points as the gRPC streams, as JSON bodies built before any clock


@dataclass(frozen=True, slots=True)
class RestBatch:
    points_json: bytes  # the batch's "data_points" array; the tenant is put around it per run
    size: int

    def body(self, tenant: str) -> bytes:
        # Tenant ids match ^[a-z][a-z0-9_]{1,47}$: nothing in them needs JSON escaping.
        return b'{"tenant_id":"%s","data_points":%s}' % (tenant.encode(), self.points_json)


def rest_batch(batch: Batch) -> RestBatch:
    """``batch`` in the JSON of ``IngestRealtimeRequest.data_points`` (timestamps RFC 3339)."""
    request = ingest_pb2.IngestRequest.FromString(batch.payload)
    points = [
        {
            "well_id": p.well_id,
            "timestamp": p.timestamp.ToJsonString(),
            "parameter_name": p.parameter_name,
            "value": p.value,
            "unit": p.unit,
            "quality_code": p.quality_code,
            "source": p.source,
        }
        for p in request.data_points
    ]
    return RestBatch(json.dumps(points, separators=(",", ":")).encode(), len(points))


# --------------------------------------------------------------------------------------------
# CPU accounting from /proc: who burns the cores while a phase runs

_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("gateway", "envoy", "client", "postgres", "redis", "other")


def _stat_fields(pid: int | str) -> tuple[str, list[str]] | None:
    """(command name, fields after it) of /proc/<pid>/stat, or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    close = stat.rindex(")")
    return stat[stat.index("(") + 1 : close], stat[close + 2 :].split()


def _cpu_seconds(fields: list[str]) -> float:
    # utime and stime (fields 14 and 15 of stat, all threads together), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle, iowait and steal excluded).
    With tick-based accounting a tick in an interrupt is also charged to the task it interrupted,
    so loopback TCP work mostly shows in the processes that send and receive."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / _TICKS


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    wall: float
    machine: float
    per_pid: dict[int, float]  # CPU seconds of every process of a watched role
    role_of: dict[int, str]


def cpu_snapshot(own: dict[str, int]) -> CpuSnapshot:
    """CPU seconds so far of the processes in ``own`` (role -> pid) and of every PostgreSQL and
    Redis process on the machine (all of them: the database is shared with other users)."""
    role_of = {pid: role for role, pid in own.items()}
    per_pid: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (stat := _stat_fields(entry.name)) is None:
            continue
        pid, (name, fields) = int(entry.name), stat
        if pid not in role_of:
            if name == "postgres":
                role_of[pid] = "postgres"
            elif name == "redis-server":
                role_of[pid] = "redis"
            else:
                continue
        per_pid[pid] = _cpu_seconds(fields)
    return CpuSnapshot(time.perf_counter(), _machine_busy_seconds(), per_pid, role_of)


@dataclass(slots=True)
class CpuUse:
    """CPU seconds per role over one phase, and the phase's wall seconds."""

    wall: float = 0.0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> CpuUse:
        use = cls(wall=after.wall - before.wall)
        for pid, seconds in after.per_pid.items():
            # A process born during the phase counts from 0; one that died is lost (rare: the
            # gateway and the benchmark keep their database connections open).
            use.seconds[after.role_of[pid]] += seconds - before.per_pid.get(pid, 0.0)
        known = sum(use.seconds.values())
        use.seconds["other"] = max(0.0, after.machine - before.machine - known)
        return use


@contextlib.contextmanager
def measuring_cpu(own: dict[str, int], into: dict[str, CpuUse], phase: str) -> Iterator[None]:
    """Stores in ``into[phase]`` the CPU use of the roles while the ``with`` block runs."""
    before = cpu_snapshot(own)
    yield
    into[phase] = CpuUse.between(before, cpu_snapshot(own))


# --------------------------------------------------------------------------------------------
# The REST phase


def rest_client(port: int, certificate: Path) -> httpx.AsyncClient:
    """One client with one keep-alive connection to Envoy, trusting its certificate, TLS 1.3."""
    context = ssl.create_default_context(cafile=str(certificate))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{port}",
        verify=context,
        http2=False,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=60,
    )


async def _post(
    client: httpx.AsyncClient, headers: dict[str, str], body: bytes, size: int
) -> httpx.Response:
    response = await client.post(REST_PATH, content=body, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"REST call answered {response.status_code}: {response.text[:500]}")
    accepted = response.json().get("accepted_count")
    if accepted != size:
        raise RuntimeError(f"REST call accepted {accepted} of {size} points: {response.text[:500]}")
    return response


async def rest_phase(
    clients: Sequence[httpx.AsyncClient], token: str, bodies: Sequence[Sequence[tuple[bytes, int]]]
) -> tuple[list[float], float]:
    """Each client posts its (body, points) one after the other; returns every request's seconds
    and the points/s from the first request to the last response."""
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}

    async def client_loop(
        client: httpx.AsyncClient, mine: Sequence[tuple[bytes, int]]
    ) -> list[float]:
        seconds = []
        for body, size in mine:
            started = time.perf_counter()
            await _post(client, headers, body, size)
            seconds.append(time.perf_counter() - started)
        return seconds

    started = time.perf_counter()
    per_client = await asyncio.gather(
        *(client_loop(c, b) for c, b in zip(clients, bodies, strict=True))
    )
    elapsed = time.perf_counter() - started
    points = sum(size for mine in bodies for _, size in mine)
    return [s for seconds in per_client for s in seconds], points / elapsed


async def wait_for_envoy(front: EnvoyFront) -> None:
    """Until Envoy has health-checked the gateway it answers 503 itself (healthy_panic_threshold
    0); wait for the first passed check on its admin interface."""
    deadline = time.monotonic() + _ENVOY_READY_SECONDS
    async with httpx.AsyncClient(base_url=front.admin_url, timeout=5) as admin:
        while time.monotonic() < deadline:
            clusters = (await admin.get("/clusters")).text
            if any(
                line.startswith("ingest_gateway::") and line.endswith("::health_flags::healthy")
                for line in clusters.splitlines()
            ):
                return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"envoy did not see the gateway healthy within {_ENVOY_READY_SECONDS:.0f} s")


async def negotiated(client: httpx.AsyncClient) -> str:
    """Opens the client's connection (with a GET, which stores nothing) and says what TLS and
    HTTP versions it negotiated."""
    response = await client.get(REST_PATH)
    tls = response.extensions["network_stream"].get_extra_info("ssl_object").version()
    return f"{tls} {response.http_version}"


# --------------------------------------------------------------------------------------------
# The runs


@dataclass(frozen=True, slots=True)
class Tenants:
    rest: str
    grpc: str


@dataclass(slots=True)
class RunResult:
    rest_pps: float = 0.0
    grpc_pps: float = 0.0  # the native figure: client streams of many batches
    grpc_one_batch_pps: float = 0.0  # one Ingest call per batch, as REST has to
    rest_latencies_s: list[float] = field(default_factory=list)
    grpc_latencies_s: list[float] = field(default_factory=list)
    cpu: dict[str, CpuUse] = field(default_factory=dict)  # per phase

    @property
    def ratio(self) -> float:
        return self.rest_pps / self.grpc_pps if self.grpc_pps else 0.0


PHASES = ("REST via Envoy", "gRPC streams", "gRPC 1-batch calls")


def _ms(samples: Sequence[float], q: int) -> float:
    return percentile(samples, q) * 1000


@dataclass(frozen=True, slots=True)
class Bench:
    """What every run uses: the connections, the workload and who to watch."""

    ingests: list[Any]  # one gRPC Ingest callable per stream, each on its own connection
    clients: list[httpx.AsyncClient]
    pool: asyncpg.Pool
    key: DevSigningKey
    audience: str
    watched: dict[str, int]  # role -> pid

    def token(self, tenant: str) -> str:
        return self.key.mint(tenant, self.audience, ttl_seconds=4 * 3600)


async def one_run(
    bench: Bench,
    label: str,
    tenants: Tenants,
    workload: Workload,
    rest: Sequence[Sequence[RestBatch]],
    rest_first: bool,
) -> RunResult:
    result = RunResult()
    # Bodies with this run's tenant, built before the clock starts.
    bodies = [[(b.body(tenants.rest), b.size) for b in mine] for mine in rest]
    rest_token, grpc_token = bench.token(tenants.rest), bench.token(tenants.grpc)

    async def rest_side() -> None:
        with measuring_cpu(bench.watched, result.cpu, PHASES[0]):
            result.rest_latencies_s, result.rest_pps = await rest_phase(
                bench.clients, rest_token, bodies
            )

    async def grpc_side() -> None:
        with measuring_cpu(bench.watched, result.cpu, PHASES[1]):
            result.grpc_pps = await gateway_phase(bench.ingests, grpc_token, workload.streams)
        with measuring_cpu(bench.watched, result.cpu, PHASES[2]):
            result.grpc_latencies_s, result.grpc_one_batch_pps = await latency_phase(
                bench.ingests, grpc_token, workload.callers
            )

    # Alternating keeps a slow drift of the machine from always hitting the same protocol.
    for side in (rest_side, grpc_side) if rest_first else (grpc_side, rest_side):
        await side()

    # Every point stored exactly once.
    expected = {
        tenants.rest: sum(size for mine in bodies for _, size in mine),
        tenants.grpc: workload.points + sum(b.size for c in workload.callers for b in c),
    }
    for tenant, rows in expected.items():
        stored = await count_rows(bench.pool, tenant)
        if stored != rows:
            raise RuntimeError(f"{label}: {tenant} holds {stored} rows, expected {rows}")
    progress(
        f"{label}: REST {result.rest_pps:,.0f} pts/s (p50 {_ms(result.rest_latencies_s, 50):.1f}"
        f" ms), gRPC {result.grpc_pps:,.0f} pts/s (1-batch calls {result.grpc_one_batch_pps:,.0f}"
        f" pts/s, p50 {_ms(result.grpc_latencies_s, 50):.1f} ms), ratio {result.ratio:.2f}"
    )
    return result


async def benchmark(args: argparse.Namespace, database_url: str, redis_url: str) -> dict[str, Any]:
    progress("building the workload")
    calls = max(args.clients, -(-args.points // args.batch))  # as many 1-batch calls as REST's
    workload = build_workload(args.points, args.clients, args.batch, calls)
    rest = [[rest_batch(b) for b in stream] for stream in workload.streams]
    warmup_batches = 3
    warmup = Workload(
        streams=[s[:warmup_batches] for s in workload.streams],
        callers=[c[:1] for c in workload.callers],
    )

    prefix = f"bench_{secrets.token_hex(3)}"
    labelled = {"warm-up": Tenants(f"{prefix}_wr", f"{prefix}_wg")}
    for n in range(1, args.runs + 1):
        labelled[f"run {n}"] = Tenants(f"{prefix}_r{n}", f"{prefix}_g{n}")
    all_tenants = [t for tenants in labelled.values() for t in (tenants.rest, tenants.grpc)]

    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-rest-") as data_dir:
        config = gateway_config(data_dir)
        key = DevSigningKey.load_or_create(config.dev_key_file)  # before the child loads it
        try:
            async with contextlib.AsyncExitStack() as stack:
                gateway = await stack.enter_async_context(
                    gateway_process(data_dir, database_url, redis_url, all_tenants, None)
                )
                front = EnvoyFront(Path(data_dir), "127.0.0.1:0", upstream_port=gateway.port)
                stack.push_async_callback(asyncio.to_thread, front.stop)
                envoy_port = await asyncio.to_thread(front.start)
                watched = {
                    "gateway": gateway.pid,
                    "envoy": front.pid or 0,
                    "client": os.getpid(),
                }
                progress(
                    f"gateway pid {watched['gateway']} on 127.0.0.1:{gateway.port}, envoy pid"
                    f" {watched['envoy']} on 127.0.0.1:{envoy_port} (TLS)"
                )
                # One connection per gRPC stream / REST client, as separate senders would have;
                # without a local subchannel pool grpc would share one TCP connection.
                channels = [
                    grpc.aio.insecure_channel(
                        f"127.0.0.1:{gateway.port}", options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                    for _ in range(args.clients)
                ]
                for channel in channels:
                    stack.push_async_callback(channel.close)
                clients = [
                    await stack.enter_async_context(rest_client(envoy_port, front.certificate))
                    for _ in range(args.clients)
                ]
                pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
                stack.push_async_callback(pool.close)
                await asyncio.gather(*(c.channel_ready() for c in channels))
                bench = Bench(
                    [ingest_callable(c) for c in channels],
                    clients,
                    pool,
                    key,
                    config.auth.audience,
                    watched,
                )

                await wait_for_envoy(front)
                versions = await asyncio.gather(*(negotiated(c) for c in clients))
                progress(f"REST connections: {', '.join(sorted(set(versions)))}")
                for n, (label, tenants) in enumerate(labelled.items()):
                    progress(f"{label} …")
                    run = await one_run(
                        bench,
                        label,
                        tenants,
                        warmup if n == 0 else workload,
                        [r[:warmup_batches] for r in rest] if n == 0 else rest,
                        rest_first=n % 2 == 1,
                    )
                    if n > 0:
                        results.append(run)
        finally:
            progress("dropping the benchmark's tenants")
            await cleanup(database_url, redis_url, all_tenants)
    return _report(args, results, watched)


# --------------------------------------------------------------------------------------------
# The report


def _median(values: Iterable[float]) -> float:
    return statistics.median(values)


def _report(
    args: argparse.Namespace, results: list[RunResult], watched: dict[str, int]
) -> dict[str, Any]:
    rest_pps = _median(r.rest_pps for r in results)
    grpc_pps = _median(r.grpc_pps for r in results)
    figures: dict[str, Any] = {
        "rest_points_per_s": round(rest_pps),
        "grpc_points_per_s": round(grpc_pps),
        "ratio": round(rest_pps / grpc_pps, 3),
        "rest_p50_ms": round(_median(_ms(r.rest_latencies_s, 50) for r in results), 1),
        "rest_p99_ms": round(_median(_ms(r.rest_latencies_s, 99) for r in results), 1),
        "grpc_p50_ms": round(_median(_ms(r.grpc_latencies_s, 50) for r in results), 1),
        "grpc_p99_ms": round(_median(_ms(r.grpc_latencies_s, 99) for r in results), 1),
        "grpc_one_batch_points_per_s": round(_median(r.grpc_one_batch_pps for r in results)),
        "points": args.points,
        "clients": args.clients,
        "batch": args.batch,
        "runs": len(results),
    }
    _print_tables(args, results, figures, watched)
    return figures


def _print_tables(
    args: argparse.Namespace,
    results: list[RunResult],
    figures: dict[str, Any],
    watched: dict[str, int],
) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"WellTegra ingest, REST via Envoy (TLS 1.3, JSON) beside native gRPC: {args.points:,}"
        f" points per protocol and run, batches of {args.batch:,}, {args.clients} clients;"
        f" {len(results)} runs"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {load}; gateway pid {watched['gateway']},"
        f" envoy pid {watched['envoy']}"
    )
    print(
        f"{'':8}{'REST':>10}{'gRPC':>10}{'ratio':>7}{'gRPC 1-b':>10}"
        f"{'REST p50':>10}{'REST p99':>10}{'gRPC p50':>10}{'gRPC p99':>10}"
    )
    print(f"{'':8}{'pts/s':>10}{'pts/s':>10}{'':>7}{'pts/s':>10}" + f"{'ms':>10}" * 4)
    for n, r in enumerate(results, start=1):
        print(
            f"{'run ' + str(n):8}{r.rest_pps:>10,.0f}{r.grpc_pps:>10,.0f}{r.ratio:>7.2f}"
            f"{r.grpc_one_batch_pps:>10,.0f}"
            f"{_ms(r.rest_latencies_s, 50):>10.1f}{_ms(r.rest_latencies_s, 99):>10.1f}"
            f"{_ms(r.grpc_latencies_s, 50):>10.1f}{_ms(r.grpc_latencies_s, 99):>10.1f}"
        )
    print(
        f"{'median':8}{figures['rest_points_per_s']:>10,}{figures['grpc_points_per_s']:>10,}"
        f"{figures['ratio']:>7.2f}{figures['grpc_one_batch_points_per_s']:>10,}"
        f"{figures['rest_p50_ms']:>10.1f}{figures['rest_p99_ms']:>10.1f}"
        f"{figures['grpc_p50_ms']:>10.1f}{figures['grpc_p99_ms']:>10.1f}"
    )
    print(
        "(ratio = median REST / median gRPC streams; gRPC 1-b = one Ingest call per batch;"
        " p50/p99 = medians over the runs of each run's per-request percentiles)"
    )
    print()
    print(
        "CPU per 1,000 points in ms (medians over the runs; cores = CPU seconds / wall seconds;"
        " postgres = all its processes, other = rest of the machine, neighbours included)"
    )
    print(f"{'':20}" + "".join(f"{role:>10}" for role in ROLES) + f"{'total':>10}")
    for phase in PHASES:
        ms = {
            role: _median(1e6 * r.cpu[phase].seconds[role] / args.points for r in results)
            for role in ROLES
        }
        cores = {
            role: _median(r.cpu[phase].seconds[role] / r.cpu[phase].wall for r in results)
            for role in ROLES
        }
        print(
            f"{phase:20}"
            + "".join(f"{ms[role]:>10.1f}" for role in ROLES)
            + f"{sum(ms.values()):>10.1f}"
        )
        print(
            f"{'  (cores busy)':20}"
            + "".join(f"{cores[role]:>10.2f}" for role in ROLES)
            + f"{sum(cores.values()):>10.2f}"
        )


# --------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--points",
        type=positive_int,
        default=100_000,
        help="points per run for REST and, separately, for gRPC (default 100000)",
    )
    parser.add_argument(
        "--clients",
        type=positive_int,
        default=4,
        help="concurrent REST clients = gRPC streams/callers, one connection each (default 4)",
    )
    parser.add_argument(
        "--batch",
        type=batch_size_arg,
        default=1000,
        help="points per request/batch, at most 1000 (default 1000)",
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="measured runs (default 3)")
    add_server_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(benchmark, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
