"""Does one tenant hammering the gateway at 10× its request limit slow another tenant down?

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/limits_isolation.py [--a-limit 300] [--b-rate 20] [--phase 15]

Tenant **B** sends ``--b-rate`` ``IngestRealtime`` calls a second, 1,000 points each, at a steady
rate (open loop: each call leaves on its schedule whether or not the previous ones have been
answered), for ``--phase`` seconds, and every call's latency is measured from its start to its
response. Tenant **A** has ``requests_per_minute = --a-limit`` (``Storage.set_limit_overrides``);
B's own limits are far above what it sends. Each run measures B in three phases, each with fresh
tenants:

* **alone**: B only, the baseline;
* **A at its limit**: A sends the same kind of calls at exactly its limit, all admitted. This is
  the load A is entitled to, and what it costs B is not a failure of isolation;
* **A at 10×**: A sends at ``--overload`` (10) times its limit. Its burst (a minute's worth) is
  spent first, unmeasured, so during the phase A is admitted at its limit and refused the rest,
  RESOURCE_EXHAUSTED ``rate_limit_exceeded`` before its message is parsed. Its calls are counted
  (admitted, refused) and the refusals timed.

B's figures "with A" are those of the 10× phase; the ratio to "alone" is the answer, and the
A-at-limit column shows how much of any difference A's admitted calls explain. The order of the
phases alternates between runs, so a slow drift of the machine does not always favour one side.

The gateway runs in a separate process, as in bench/gateway_throughput.py, whose helpers this
reuses (the gateway process, its configuration, the embedded servers, the clean-up). Requests
are serialised before any clock starts. The output is a table and exactly one line of JSON, the
last line; every figure is the median over the runs (default 3). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

# The throughput benchmark, a sibling module: run as a script, Python puts bench/ on sys.path.
from gateway_throughput import (
    add_server_arguments,
    cleanup,
    gateway_config,
    gateway_process,
    percentile,
    positive_int,
    progress,
    run_benchmark,
)
from google.rpc import error_details_pb2, status_pb2
from redis import asyncio as aioredis

from ingest_service.config import StorageConfig
from ingest_service.devkeys import DevSigningKey
from ingest_service.storage import Storage
from welltegra.ingest.v1 import ingest_pb2

REALTIME_METHOD = "/welltegra.ingest.v1.IngestService/IngestRealtime"
POINTS_PER_CALL = 1000
AMPLE = {"requests_per_minute": 10_000_000, "bytes_per_day": 10**15}

# Canonical units: the gateway's conversion is the identity.
_PARAMETERS = (
    ("wellhead_pressure", "psi", 6_750.0),
    ("hookload", "klbs", 215.0),
    ("flow_rate", "bbl/day", 1_200.0),
    ("downhole_temperature", "degF", 212.0),
)
_WELLS = 8
_TICK_US = 100_000


# --------------------------------------------------------------------------------------------
# The workload


def build_calls(prefix: str, calls: int) -> list[bytes]:
    """``calls`` serialised IngestRealtimeRequests of 1,000 distinct points each, from yesterday
    (UTC) on, so no point is in the future and every one is new to a fresh tenant."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    base_us = (today - timedelta(days=1) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        microseconds=1
    )
    combos = _WELLS * len(_PARAMETERS)
    wells = [f"{prefix}_WELL_{w:03d}" for w in range(_WELLS)]
    result = []
    for call in range(calls):
        request = ingest_pb2.IngestRealtimeRequest()
        for i in range(POINTS_PER_CALL):
            j = call * POINTS_PER_CALL + i
            name, unit, typical = _PARAMETERS[(j // _WELLS) % len(_PARAMETERS)]
            point = request.data_points.add(
                well_id=wells[j % _WELLS],
                parameter_name=name,
                value=typical + (j % 997) * 0.01,
                unit=unit,
                quality_code="GOOD",
                source="SCADA_OPC_UA",
            )
            seconds, micros = divmod(base_us + (j // combos) * _TICK_US, 1_000_000)
            point.timestamp.seconds = seconds
            point.timestamp.nanos = micros * 1000
        result.append(request.SerializeToString())
    return result


def one_point_call() -> bytes:
    request = ingest_pb2.IngestRealtimeRequest()
    point = request.data_points.add(
        well_id="DRAIN", parameter_name="flow_rate", value=1.0, unit="bbl/day"
    )
    point.timestamp.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    return request.SerializeToString()


# --------------------------------------------------------------------------------------------
# Sending


@dataclass(slots=True)
class Sender:
    """What one tenant's calls of one phase did."""

    latencies_s: list[float] = field(default_factory=list)  # admitted calls
    refused_s: list[float] = field(default_factory=list)  # refused calls, rate_limit_exceeded
    failures: list[str] = field(default_factory=list)  # anything else
    points: int = 0
    first_sent: float = 0.0
    last_answer: float = 0.0

    @property
    def points_per_s(self) -> float:
        elapsed = self.last_answer - self.first_sent
        return self.points / elapsed if elapsed > 0 else 0.0


def _reason(error: grpc.aio.AioRpcError) -> str:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw:
        for detail in status_pb2.Status.FromString(raw).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
    return str(error.code())


async def _call(realtime: Any, payload: bytes, metadata: Any, into: Sender) -> None:
    started = time.perf_counter()
    try:
        response = await realtime(payload, metadata=metadata, timeout=60)
    except grpc.aio.AioRpcError as error:
        took = time.perf_counter() - started
        reason = _reason(error)
        if reason == "rate_limit_exceeded":
            into.refused_s.append(took)
        else:
            into.failures.append(f"{reason}: {error.details()}")
    else:
        into.latencies_s.append(time.perf_counter() - started)
        into.points += response.accepted_count
    into.last_answer = max(into.last_answer, time.perf_counter())


async def steady(realtime: Any, token: str, payloads: Sequence[bytes], rate: float) -> Sender:
    """Send ``payloads`` at ``rate`` calls a second, on schedule (open loop)."""
    sender = Sender()
    metadata = (("authorization", f"Bearer {token}"),)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sender.first_sent = time.perf_counter()
    calls = []
    for n, payload in enumerate(payloads):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        calls.append(asyncio.create_task(_call(realtime, payload, metadata, sender)))
    await asyncio.gather(*calls)
    return sender


async def drain_burst(realtime: Any, token: str, limit: int) -> None:
    """Spend A's burst (a minute's worth of calls at once) with one-point calls, so that what
    follows meets the steady limit, not the burst."""
    metadata = (("authorization", f"Bearer {token}"),)
    payload = one_point_call()
    sender = Sender()
    for start in range(0, limit, 16):
        await asyncio.gather(
            *(_call(realtime, payload, metadata, sender) for _ in range(min(16, limit - start)))
        )
    if sender.failures or sender.refused_s:
        raise RuntimeError(f"draining A's burst: {sender.failures or 'refused'}")


# --------------------------------------------------------------------------------------------
# Runs


PHASES = ("alone", "at_limit", "flood")


@dataclass(frozen=True, slots=True)
class Load:
    a_limit: int  # A's requests_per_minute
    overload: float  # A's rate in the flood phase, in multiples of its limit
    b_rate: float  # B's calls per second
    phase_s: float

    @property
    def a_rate(self) -> float:
        return self.a_limit / 60

    def titles(self) -> dict[str, str]:
        return {
            "alone": "B alone",
            "at_limit": "B + A at limit",
            "flood": f"B + A at {self.overload:g}×",
        }


@dataclass(slots=True)
class Phase:
    b: Sender
    a: Sender | None = None
    wall_s: float = 0.0
    gateway_cpu_s: float = 0.0  # the gateway process's CPU time during the phase
    client_cpu_s: float = 0.0  # this process's (both senders')

    @property
    def gateway_cores(self) -> float:
        return self.gateway_cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def client_cores(self) -> float:
        return self.client_cpu_s / self.wall_s if self.wall_s else float("nan")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, from /proc (nan where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


@dataclass(frozen=True, slots=True)
class RunTenants:
    b: dict[str, str]  # phase -> B's tenant
    a: dict[str, str]  # phase -> A's tenant (no A when alone)

    def all(self) -> list[str]:
        return [*self.b.values(), *self.a.values()]


def run_tenants(prefix: str, label: str) -> RunTenants:
    return RunTenants(
        b={p: f"{prefix}_{label}_b_{p}" for p in PHASES},
        a={p: f"{prefix}_{label}_a_{p}" for p in PHASES if p != "alone"},
    )


@dataclass(frozen=True, slots=True)
class Clients:
    """The two clients' call objects, the token minting and a storage to count rows."""

    realtime_b: Any
    realtime_a: Any
    mint: Callable[[str], str]
    storage: Storage
    gateway_pid: int


async def one_run(
    label: str,
    tenants: RunTenants,
    order: Sequence[str],
    load: Load,
    b_calls: list[bytes],
    a_calls: list[bytes],
    gw: Clients,
) -> dict[str, Phase]:
    results: dict[str, Phase] = {}
    b_calls = b_calls[: max(1, round(load.b_rate * load.phase_s))]
    for name in order:
        a_send = None
        if name != "alone":
            a_token = gw.mint(tenants.a[name])
            rate = load.a_rate * (load.overload if name == "flood" else 1)
            if name == "flood":
                await drain_burst(gw.realtime_a, a_token, load.a_limit)
            a_send = steady(
                gw.realtime_a, a_token, a_calls[: max(1, round(rate * load.phase_s))], rate
            )
        b_send = steady(gw.realtime_b, gw.mint(tenants.b[name]), b_calls, load.b_rate)
        started = time.perf_counter()
        gateway_cpu, client_cpu = process_cpu_s(gw.gateway_pid), time.process_time()
        if a_send is None:
            phase = Phase(b=await b_send)
        else:
            b, a = await asyncio.gather(b_send, a_send)
            phase = Phase(b=b, a=a)
        phase.wall_s = time.perf_counter() - started
        phase.gateway_cpu_s = process_cpu_s(gw.gateway_pid) - gateway_cpu
        phase.client_cpu_s = time.process_time() - client_cpu
        results[name] = phase
        if phase.b.failures or phase.b.refused_s:
            raise RuntimeError(
                f"{label} {name}: B was refused {len(phase.b.refused_s)} times,"
                f" failed {phase.b.failures[:3]}"
            )
        if phase.a is not None and phase.a.failures:
            raise RuntimeError(f"{label} {name}: A failed otherwise: {phase.a.failures[:3]}")
        # Every point of B stored once; of A, its admitted calls' points only (and the one
        # point the burst was spent with).
        expected = {tenants.b[name]: len(b_calls) * POINTS_PER_CALL}
        if phase.a is not None:
            drained = 1 if name == "flood" else 0
            expected[tenants.a[name]] = len(phase.a.latencies_s) * POINTS_PER_CALL + drained
        for tenant, rows in expected.items():
            stored = await gw.storage.pool.fetchval(
                f'SELECT count(*) FROM "{tenant}_streams".real_time_parameters'
            )
            if stored != rows:
                raise RuntimeError(f"{label} {name}: {tenant} holds {stored} rows, expected {rows}")
        progress(f"{label} {load.titles()[name]}: {describe(phase)}")
    return results


def ms(samples: Sequence[float], q: int) -> float:
    return percentile(samples, q) * 1000 if samples else float("nan")


def describe(phase: Phase) -> str:
    text = (
        f"B p50 {ms(phase.b.latencies_s, 50):.1f} ms, p99 {ms(phase.b.latencies_s, 99):.1f} ms,"
        f" {phase.b.points_per_s:,.0f} pts/s"
    )
    if phase.a is not None:
        text += f"; A admitted {len(phase.a.latencies_s)}, refused {len(phase.a.refused_s)}"
        if phase.a.refused_s:
            text += f" (p50 {ms(phase.a.refused_s, 50):.1f} ms)"
    text += f"; gateway {phase.gateway_cores:.2f} cores, client {phase.client_cores:.2f}"
    return text


async def benchmark(args: argparse.Namespace, database_url: str, redis_url: str) -> dict[str, Any]:
    load = Load(args.a_limit, args.overload, args.b_rate, args.phase)
    warm_up = Load(args.a_limit, args.overload, args.b_rate, min(args.phase, 3.0))
    progress("building the workload")
    b_calls = build_calls("B", max(1, round(load.b_rate * load.phase_s)))
    a_calls = build_calls("A", max(1, round(load.a_rate * load.overload * load.phase_s)))

    prefix = f"bench_{secrets.token_hex(3)}"
    labelled = {"warm-up": run_tenants(prefix, "w")}
    for n in range(1, args.runs + 1):
        labelled[f"run {n}"] = run_tenants(prefix, f"r{n}")
    all_tenants = [t for tenants in labelled.values() for t in tenants.all()]

    runs: list[dict[str, Phase]] = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-") as data_dir:
        config = gateway_config(data_dir)
        key = DevSigningKey.load_or_create(config.dev_key_file)  # before the child loads it

        def mint(tenant: str) -> str:
            return key.mint(tenant, config.auth.audience, ttl_seconds=4 * 3600)

        storage = await Storage.connect(database_url, StorageConfig(pool_min_size=1))
        try:
            async with gateway_process(
                data_dir, database_url, redis_url, all_tenants, None
            ) as process:
                progress(f"gateway pid {process.pid} listening on 127.0.0.1:{process.port}")
                # Before any call, so the gateway's 30 s cache of overrides is not in the way.
                for tenants in labelled.values():
                    for tenant in tenants.b.values():
                        await storage.set_limit_overrides(tenant, AMPLE)
                    for tenant in tenants.a.values():
                        await storage.set_limit_overrides(
                            tenant, {**AMPLE, "requests_per_minute": load.a_limit}
                        )
                # A and B are separate clients, with a TCP connection each.
                channels = [
                    grpc.aio.insecure_channel(
                        f"127.0.0.1:{process.port}",
                        options=[("grpc.use_local_subchannel_pool", 1)],
                    )
                    for _ in "ab"
                ]
                try:
                    await asyncio.gather(*(c.channel_ready() for c in channels))
                    realtime_b, realtime_a = (
                        c.unary_unary(
                            REALTIME_METHOD,
                            request_serializer=None,  # already bytes
                            response_deserializer=ingest_pb2.IngestRealtimeResponse.FromString,
                        )
                        for c in channels
                    )
                    gw = Clients(realtime_b, realtime_a, mint, storage, process.pid)
                    for n, (label, tenants) in enumerate(labelled.items()):
                        progress(f"{label} …")
                        # Alternate the order of the phases from run to run.
                        order = PHASES if n % 2 == 1 or n == 0 else PHASES[::-1]
                        result = await one_run(
                            label, tenants, order, warm_up if n == 0 else load, b_calls, a_calls, gw
                        )
                        if n > 0:
                            runs.append(result)
                finally:
                    await asyncio.gather(*(c.close() for c in channels))
        finally:
            await storage.close()
            progress("dropping the benchmark's tenants")
            await cleanup(database_url, redis_url, all_tenants)
            await _drop_limit_keys(redis_url, all_tenants)
    return report(load, runs, process.pid)


async def _drop_limit_keys(redis_url: str, tenants: list[str]) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for tenant in tenants:
            keys = [k async for k in redis.scan_iter(match=f"limits:{{{tenant}}}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
    finally:
        await redis.aclose()


# --------------------------------------------------------------------------------------------
# Report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(load: Load, runs: list[dict[str, Phase]], gateway_pid: int) -> dict[str, Any]:
    def b_median(figure: Callable[[Sender], float]) -> dict[str, float]:
        return {p: _median([figure(run[p].b) for run in runs]) for p in PHASES}

    def a_median(figure: Callable[[Sender], float]) -> dict[str, float]:
        return {p: _median([figure(_a(run[p])) for run in runs]) for p in PHASES[1:]}

    b_p50 = b_median(lambda s: ms(s.latencies_s, 50))
    b_p99 = b_median(lambda s: ms(s.latencies_s, 99))
    b_pps = b_median(lambda s: s.points_per_s)
    a_admitted = a_median(lambda s: len(s.latencies_s))
    a_refused = a_median(lambda s: len(s.refused_s))
    a_admitted_p50 = a_median(lambda s: ms(s.latencies_s, 50))
    a_refused_p50 = a_median(lambda s: ms(s.refused_s, 50))["flood"]
    gateway_cores = {p: _median([run[p].gateway_cores for run in runs]) for p in PHASES}
    client_cores = {p: _median([run[p].client_cores for run in runs]) for p in PHASES}
    # What the refused calls cost the gateway: its CPU beyond the at-limit phase's, whose
    # admitted calls are the same, per refused call.
    per_refusal_ms = _median(
        [
            (run["flood"].gateway_cpu_s - run["at_limit"].gateway_cpu_s)
            / max(1, len(_a(run["flood"]).refused_s))
            * 1000
            for run in runs
        ]
    )
    figures: dict[str, Any] = {
        "b_p50_alone_ms": round(b_p50["alone"], 1),
        "b_p50_with_a_ms": round(b_p50["flood"], 1),
        "ratio_p50": round(b_p50["flood"] / b_p50["alone"], 3),
        "b_p99_alone_ms": round(b_p99["alone"], 1),
        "b_p99_with_a_ms": round(b_p99["flood"], 1),
        "ratio_p99": round(b_p99["flood"] / b_p99["alone"], 3),
        "b_points_per_s_alone": round(b_pps["alone"]),
        "b_points_per_s_with_a": round(b_pps["flood"]),
        "b_p50_with_a_at_limit_ms": round(b_p50["at_limit"], 1),
        "b_p99_with_a_at_limit_ms": round(b_p99["at_limit"], 1),
        "a_refused": round(a_refused["flood"]),
        "a_admitted": round(a_admitted["flood"]),
        "a_refused_p50_ms": round(a_refused_p50, 2),
        "gateway_cpu_ms_per_refused_call": round(per_refusal_ms, 2),
        "gateway_cores_alone": round(gateway_cores["alone"], 2),
        "gateway_cores_with_a": round(gateway_cores["flood"], 2),
        "a_limit_per_minute": load.a_limit,
        "a_calls_per_s": round(load.a_rate * load.overload, 2),
        "b_calls_per_s": load.b_rate,
        "points_per_call": POINTS_PER_CALL,
        "phase_s": load.phase_s,
        "runs": len(runs),
    }
    _print_tables(load, runs, gateway_pid, b_p50, b_p99, b_pps)
    titles = load.titles()
    print(
        f"{'A calls admitted':<26}{'-':>10}{a_admitted['at_limit']:>16,.0f}"
        f"{a_admitted['flood']:>16,.0f}"
    )
    print(
        f"{'A calls refused':<26}{'-':>10}{a_refused['at_limit']:>16,.0f}"
        f"{a_refused['flood']:>16,.0f}"
    )
    print(
        f"{'A admitted call p50, ms':<26}{'-':>10}{a_admitted_p50['at_limit']:>16.1f}"
        f"{a_admitted_p50['flood']:>16.1f}"
    )
    print(f"{'A refused call p50, ms':<26}{'-':>10}{'-':>16}{a_refused_p50:>16.2f}")
    for title, cores in (
        ("gateway cores busy", gateway_cores),
        ("client cores busy", client_cores),
    ):
        print(
            f"{title:<26}{cores['alone']:>10.2f}{cores['at_limit']:>16.2f}{cores['flood']:>16.2f}"
        )
    print(
        f"{'gateway CPU per refusal':<26}{'':>10}{'':>16}{per_refusal_ms:>13.2f} ms"
        "  (gateway CPU beyond the at-limit phase / refused calls)"
    )
    print(
        f"(B: open-loop calls at a steady rate, each timed from its start to its response."
        f" {titles['flood']}: A's burst spent first; its refused calls are RESOURCE_EXHAUSTED"
        f" rate_limit_exceeded. Counts are per run.)"
    )
    return figures


def _a(phase: Phase) -> Sender:
    assert phase.a is not None
    return phase.a


def _print_tables(
    load: Load,
    runs: list[dict[str, Phase]],
    gateway_pid: int,
    b_p50: dict[str, float],
    b_p99: dict[str, float],
    b_pps: dict[str, float],
) -> None:
    titles = load.titles()
    machine_load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"WellTegra per-tenant limits isolation: tenant B sends {load.b_rate:g} IngestRealtime"
        f" calls/s of {POINTS_PER_CALL:,} points for {load.phase_s:g} s; tenant A is limited to"
        f" {load.a_limit} requests/minute and sends {load.a_rate:g}/s (at its limit) or"
        f" {load.a_rate * load.overload:g}/s ({load.overload:g}× its limit); {len(runs)} runs"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {machine_load}; gateway pid {gateway_pid}"
    )
    print()
    print(
        f"{'':8}{'phase':<16}{'B p50':>8}{'B p99':>8}{'B pts/s':>10}"
        f"{'A admitted':>12}{'A refused':>11}{'A refusal p50':>15}{'gateway':>9}{'client':>8}"
    )
    print(
        f"{'':8}{'':<16}{'ms':>8}{'ms':>8}{'':>10}{'':>12}{'':>11}{'ms':>15}{'cores':>9}"
        f"{'cores':>8}"
    )
    for n, run in enumerate(runs, start=1):
        for phase in PHASES:
            b, a = run[phase].b, run[phase].a
            line = (
                f"{'run ' + str(n):8}{titles[phase]:<16}{ms(b.latencies_s, 50):>8.1f}"
                f"{ms(b.latencies_s, 99):>8.1f}{b.points_per_s:>10,.0f}"
            )
            if a is None:
                line += f"{'-':>12}{'-':>11}{'-':>15}"
            else:
                refusal = f"{ms(a.refused_s, 50):.2f}" if a.refused_s else "-"
                line += f"{len(a.latencies_s):>12}{len(a.refused_s):>11}{refusal:>15}"
            line += f"{run[phase].gateway_cores:>9.2f}{run[phase].client_cores:>8.2f}"
            print(line)
    print()
    print(
        f"{f'medians of {len(runs)} runs':<26}{titles['alone']:>10}{titles['at_limit']:>16}"
        f"{titles['flood']:>16}{'ratio':>8}"
    )
    for title, values, fmt in (
        ("B p50 latency, ms", b_p50, ".1f"),
        ("B p99 latency, ms", b_p99, ".1f"),
        ("B points/s", b_pps, ",.0f"),
    ):
        print(
            f"{title:<26}{values['alone']:>10{fmt}}{values['at_limit']:>16{fmt}}"
            f"{values['flood']:>16{fmt}}{values['flood'] / values['alone']:>8.2f}"
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
        "--a-limit",
        type=positive_int,
        default=300,
        help="tenant A's requests_per_minute (default 300)",
    )
    parser.add_argument(
        "--overload",
        type=positive_float,
        default=10.0,
        help="how many times its limit A sends in the flood phase (default 10)",
    )
    parser.add_argument(
        "--b-rate",
        type=positive_float,
        default=20.0,
        help="tenant B's calls per second, 1,000 points each (default 20)",
    )
    parser.add_argument(
        "--phase", type=positive_float, default=15.0, help="seconds per phase (default 15)"
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="measured runs (default 3)")
    add_server_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(benchmark, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
