"""The whole path as separate processes, as on a site and in the cloud: ``welltegra-ingest
serve`` with its development OAuth issuer, and ``welltegra-agent run``, each a real process
that a test can stop, restart or ``kill -9``; plus the counting that proves nothing was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.collectors.simulator import Simulator, SimulatorConfig

GATEWAY = [sys.executable, "-m", "ingest_service.cli"]
AGENT = [sys.executable, "-m", "edge.cli"]
ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class GatewayServer:
    """``welltegra-ingest serve --dev-issuer`` on fixed loopback ports, restartable."""

    data_dir: Path
    database_url: str
    redis_url: str
    master_key: str
    port: int = field(default_factory=free_port)
    issuer_port: int = field(default_factory=free_port)
    token_lifetime: str = "1h"
    env: Mapping[str, str] = field(default_factory=dict)  # added to this process's environment
    metrics_port: int | None = None  # serve /metrics here (--metrics-listen) when set
    process: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.issuer_port}/oauth/token"

    def _config(self) -> Path:
        path = self.data_dir / "gateway.yaml"
        config = {
            "grpc_listen": self.target,
            "data_dir": str(self.data_dir),
            "dev_issuer": {
                "enabled": True,
                "listen": f"127.0.0.1:{self.issuer_port}",
                "token_lifetime": self.token_lifetime,
            },
            "limits": {"requests_per_minute": 1_000_000, "bytes_per_day": 10**15},
        }
        if self.metrics_port is not None:
            config["metrics_listen"] = f"127.0.0.1:{self.metrics_port}"
        path.write_text(yaml.safe_dump(config))
        return path

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "WELLTEGRA_MASTER_KEY": self.master_key,
            **self.env,
        }
        log = (self.data_dir / "gateway.log").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *GATEWAY, "serve", "--config", str(self._config()),
            env=env, cwd=ROOT, stdout=log, stderr=log,
        )
        log.close()
        await self.wait_serving()

    async def wait_serving(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise RuntimeError(f"the gateway exited: {self.log_tail()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start: {self.log_tail()}")
                await asyncio.sleep(0.1)
        # The issuer listens once serve has started it: wait for its port too.
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.issuer_port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return
        raise RuntimeError("the development issuer did not start")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the gateway: SIGTERM for a graceful stop, SIGKILL for a crash."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(sig)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def log_tail(self) -> str:
        path = self.data_dir / "gateway.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def agent_config(
    path: Path,
    gateway: GatewayServer,
    tenant: str,
    client_id: str,
    client_secret: str,
    *,
    wells: int = 3,
    rate: float = 10.0,
    seed: int = 1,
    buffer: Mapping[str, Any] | None = None,
    api: Mapping[str, Any] | None = None,
    oauth: Mapping[str, Any] | None = None,
    simulator: Mapping[str, Any] | None = None,
) -> Path:
    """Write an agent config for ``gateway``'s tenant with one simulator source, return it."""
    config: dict[str, Any] = {
        "tenant": {"id": tenant},
        "api": {
            "grpc_target": gateway.target,
            "tls": {"enabled": False},
            "live_window": "2s",
            **(api or {}),
        },
        "oauth": {
            "token_url": gateway.token_url,
            "client_id": client_id,
            "client_secret": client_secret,
            **(oauth or {}),
        },
        "data_sources": [
            {
                "name": "sim",
                "type": "simulator",
                "wells": [f"WELL-{i:03d}" for i in range(1, wells + 1)],
                "rate": rate,
                "seed": seed,
                "out_of_range_ratio": 0,
                **(simulator or {}),
            }
        ],
        "buffer": {"database_path": str(path.parent / "buffer.db"), **(buffer or {})},
        "retry": {"initial_delay": "200ms", "max_delay": "1s"},
        "logging": {"file": str(path.parent / "agent.log")},
        "monitoring": {"health_check_port": 0, "prometheus_metrics_port": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def run_agent(
    config: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``welltegra-agent run -c config`` as a process of its own, ``env`` added to this
    process's environment."""
    log = (config.parent / "agent.out").open("ab")
    process = await asyncio.create_subprocess_exec(
        *AGENT, "run", "-c", str(config), cwd=ROOT, stdout=log, stderr=log,
        env={**os.environ, **(env or {})},
    )
    log.close()
    return process


async def stop_agent(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if process.returncode is None:
        process.send_signal(sig)
    await asyncio.wait_for(process.wait(), timeout=60)


Identity = tuple[str, str, datetime]


async def stored_points(database_url: str, tenant: str) -> list[Identity]:
    """Every stored point's identity (well, parameter, time), read as the database owner."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f'SELECT well_id, parameter_name, ts FROM "{tenant}_streams".real_time_parameters'
        )
    finally:
        await conn.close()
    return [(r["well_id"], r["parameter_name"], r["ts"]) for r in rows]


async def stored_gaps(database_url: str, tenant: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(f'SELECT * FROM "{tenant}_streams".data_gaps'))
    finally:
        await conn.close()


def expected_points(simulator: SimulatorConfig, first: datetime, last: datetime) -> set[Identity]:
    """What the simulator produced from ``first`` to ``last`` (inclusive)."""
    source = Simulator(simulator)
    return {
        (r.well_id, r.parameter, r.timestamp)
        for r in source.readings_between(source.tick_of(first), source.tick_of(last))
    }


def assert_contiguous(points: list[Identity], simulator: SimulatorConfig) -> tuple[int, int]:
    """Every tag holds every tick from the first stored one to the last, exactly once, and
    all tags end at the same tick; the (first, last) tick."""
    assert points, "nothing was stored"
    assert len(points) == len(set(points)), "a point was stored twice"
    source = Simulator(simulator)
    ticks: dict[tuple[str, str], list[int]] = {}
    for well, parameter, ts in points:
        ticks.setdefault((well, parameter), []).append(source.tick_of(ts))
    tags = {(w, p) for w in simulator.wells for p in simulator.parameters}
    assert set(ticks) == tags
    first = min(min(t) for t in ticks.values())
    last = max(max(t) for t in ticks.values())
    for tag, found in ticks.items():
        missing = sorted(set(range(first, last + 1)) - set(found))
        assert not missing, f"{tag}: {len(missing)} ticks missing, first {missing[:5]}"
    return first, last


async def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.2) -> None:
    """Poll an async predicate until true (the condition, not a duration, is what is tested)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
