"""OPC UA subscription to stored row: how long a value takes from its source timestamp on an OPC UA
server to its row in PostgreSQL, through the edge agent and the gateway.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/opcua_latency.py [--tags 4] [--rate 100] [--seconds 15]

Three processes on the same machine clock:

* an **OPC UA server** (asyncua, a ``spawn`` child): SignAndEncrypt with Basic256Sha256 and a
  user, ``--tags`` Double variables (``--tags`` / 4 wells × wellhead pressure, hookload, flow
  rate, downhole temperature) that it changes ``--rate`` times a second, every change stamped
  with the wall clock at the moment it is written (its source timestamp);
* the **gateway** (a ``spawn`` child, ``gateway_process`` of bench/gateway_throughput.py, with
  ``--dev``);
* this process: the **agent** (``edge.agent.Agent``: the ``opcua`` collector subscribed with
  ``--publishing-interval``, transform, buffer, uploader), and the development OAuth issuer the
  agent gets its token from (``DevIssuer``, signing with the gateway's development key, which the
  gateway's ``--dev`` trusts).

Once the agent has subscribed, the server changes values for ``--warmup`` seconds (not
measured), then for ``--seconds`` seconds. Every value of the measured window must be stored,
once, or the benchmark fails; each one's latency is its row's ``ingested_at`` (PostgreSQL's
``now()``, the start of the gateway's transaction, a few ms before its commit) minus its source
timestamp. The agent's own delays are part of it: the publishing interval, the buffer's linger
(``buffer.linger``, 200 ms) before a batch is sealed, and the live lane's upload.

The **baseline** is the gateway alone, measured the same way after the agent has stopped: one-
point ``IngestRealtime`` calls, each point stamped with the wall clock as its call leaves,
``--rate`` calls a second for ``--baseline-calls`` calls, from this process over one connection.

The output is a table and exactly one line of JSON, the last line. Target: p99 < 1 s. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import yaml
from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

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

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.config import DEV_ISSUER, DevIssuerConfig
from ingest_service.dev_issuer import DevIssuer, create_client, key_directory
from ingest_service.devkeys import DevSigningKey
from welltegra.ingest.v1 import ingest_pb2

REALTIME_METHOD = "/welltegra.ingest.v1.IngestService/IngestRealtime"
TARGET_P99_MS = 1000.0
USER = "bench"
# parameter, unit, typical value
PARAMETERS = (
    ("wellhead_pressure", "psi", 2_500.0),
    ("hookload", "klbs", 250.0),
    ("flow_rate", "bbl/day", 1_200.0),
    ("downhole_temperature", "degF", 210.0),
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tag_of(index: int) -> tuple[str, str, str, float]:
    """Variable ``index``'s well, parameter, unit and typical value."""
    parameter, unit, typical = PARAMETERS[index % len(PARAMETERS)]
    return f"WELL-{index // len(PARAMETERS) + 1:03d}", parameter, unit, typical


# --------------------------------------------------------------------------------------------
# The OPC UA server, in its own process


def _opcua_child(
    conn: Connection,
    endpoint: str,
    tags: int,
    rate: float,
    certificate: str,
    key: str,
    password: str,
) -> None:
    asyncio.run(_serve_opcua(conn, endpoint, tags, rate, certificate, key, password))


class _Users:
    """asyncua's user manager interface: the one user of the benchmark."""

    def __init__(self, password: str) -> None:
        self.password = password

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, **_: Any
    ) -> User | None:
        if (username, password) == (USER, self.password):
            return User(role=UserRole.User)
        return None


async def _serve_opcua(
    conn: Connection,
    endpoint: str,
    tags: int,
    rate: float,
    certificate: str,
    key: str,
    password: str,
) -> None:
    """Serve; on ("write", seconds) change every variable ``rate`` times a second for that long
    and answer ("written", ticks, first, last); stop on anything else or when the parent goes."""
    server = Server(user_manager=_Users(password))  # type: ignore[arg-type]
    await server.init()
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    server.set_identity_tokens([ua.UserNameIdentityToken])
    await server.load_certificate(certificate)
    await server.load_private_key(key)
    await server.register_namespace("urn:welltegra:bench")
    nodes = []
    for index in range(tags):
        well, parameter, _, typical = tag_of(index)
        nodes.append(
            await server.nodes.objects.add_variable(
                ua.NodeId.from_string(f"ns=2;i={index + 1}"), f"{well}.{parameter}", typical
            )
        )
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        conn.send(("ready", endpoint))
        while True:
            message = await loop.run_in_executor(None, _receive, conn)
            if not (isinstance(message, tuple) and message[0] == "write"):
                return
            ticks = max(1, round(message[1] * rate))
            first = last = datetime.now(UTC)
            due = time.monotonic()
            for tick in range(ticks):
                due += 1 / rate
                last = datetime.now(UTC)
                if tick == 0:
                    first = last
                for index, node in enumerate(nodes):
                    typical = tag_of(index)[3]
                    await node.write_value(
                        ua.DataValue(
                            ua.Variant(typical + (tick % 100) * 0.1, ua.VariantType.Double),
                            SourceTimestamp=last,  # type: ignore[arg-type]
                            ServerTimestamp=last,  # type: ignore[arg-type]
                        )
                    )
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            conn.send(("written", ticks, first, last))
    finally:
        await server.stop()


def _receive(conn: Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:
        return None


@dataclass
class OpcUaProcess:
    conn: Connection
    endpoint: str
    pid: int
    password: str

    async def write(self, seconds: float) -> tuple[int, datetime, datetime]:
        """Change every variable for ``seconds``; (ticks, first timestamp, last timestamp)."""
        self.conn.send(("write", seconds))
        message = await asyncio.to_thread(self.conn.recv)
        return int(message[1]), message[2], message[3]


@contextlib.asynccontextmanager
async def opcua_process(
    directory: Path, tags: int, rate: float
) -> AsyncIterator[tuple[OpcUaProcess, Path]]:
    """The server in a spawned child; with the path of its certificate (to pin)."""
    password = secrets.token_urlsafe(16)
    key = cert_gen.generate_private_key()
    uri = "urn:welltegra:bench:opcua"
    certificate = cert_gen.generate_self_signed_app_certificate(
        key, "bench", {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH], days=2,
    )
    certificate_path, key_path = directory / "server.der", directory / "server.key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/bench/"
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=_opcua_child,
        args=(child_end, endpoint, tags, rate, str(certificate_path), str(key_path), password),
        name="opcua-server",
    )
    process.start()
    child_end.close()
    try:
        if not await asyncio.to_thread(parent_end.poll, 60):
            raise RuntimeError("the OPC UA server did not start within 60 s")
        message = parent_end.recv()
        assert process.pid is not None
        yield OpcUaProcess(parent_end, message[1], process.pid, password), certificate_path
    finally:
        with contextlib.suppress(OSError):
            parent_end.send("stop")
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.terminate()  # our own child, by its handle
            await asyncio.to_thread(process.join, 10)
        parent_end.close()


# --------------------------------------------------------------------------------------------
# The agent


def write_agent_config(
    path: Path,
    tenant: str,
    gateway_port: int,
    token_url: str,
    client_id: str,
    client_secret: str,
    opcua: OpcUaProcess,
    server_certificate: Path,
    args: argparse.Namespace,
) -> Path:
    tags = []
    for index in range(args.tags):
        well, parameter, unit, _ = tag_of(index)
        tags.append(
            {
                "node_id": f"ns=2;i={index + 1}",
                "well_id": well,
                "parameter": parameter,
                "unit": unit,
            }
        )
    config = {
        "tenant": {"id": tenant},
        "api": {"grpc_target": f"127.0.0.1:{gateway_port}", "tls": {"enabled": False}},
        "oauth": {"token_url": token_url, "client_id": client_id, "client_secret": client_secret},
        "data_sources": [
            {
                "name": "scada",
                "type": "opcua",
                "connection": {
                    "endpoint": opcua.endpoint,
                    "security_mode": "SignAndEncrypt",
                    "security_policy": "Basic256Sha256",
                    "username": USER,
                    "password": opcua.password,
                    "certificate_dir": str(path.parent / "pki"),
                    "server_certificate": str(server_certificate),
                },
                "publishing_interval": args.publishing_interval,
                "tags": tags,
            }
        ],
        "buffer": {"database_path": str(path.parent / "buffer.db")},
        "retry": {"initial_delay": "200ms", "max_delay": "2s"},
        "logging": {"level": "WARNING"},
        "monitoring": {"health_check_port": 0, "prometheus_metrics_port": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def subscribed(agent: Agent, tags: int, timeout: float = 60) -> None:
    """Wait until every tag has a watermark: the subscription delivers."""
    assert agent.buffer is not None
    deadline = time.monotonic() + timeout
    while True:
        marks = [await agent.buffer.watermark("scada", f"ns=2;i={i + 1}") for i in range(tags)]
        if all(marks):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not subscribe within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def stored_latencies(
    pool: asyncpg.Pool, tenant: str, first: datetime, last: datetime, expected: int
) -> list[float]:
    """Seconds from source timestamp to ``ingested_at`` of the rows from ``first`` to ``last``,
    once there are ``expected`` of them."""
    query = (
        f'SELECT extract(epoch FROM ingested_at - ts)::float8 FROM "{tenant}_streams"'
        ".real_time_parameters WHERE ts BETWEEN $1 AND $2"
    )
    deadline = time.monotonic() + 60
    while True:
        rows = await pool.fetch(query, first, last)
        if len(rows) >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if len(rows) != expected:
        raise RuntimeError(f"{tenant}: {len(rows)} rows stored from {first} to {last}, "
                           f"expected {expected}")
    return [r[0] for r in rows]


# --------------------------------------------------------------------------------------------
# The baseline: the gateway alone


async def baseline(port: int, token: str, calls: int, rate: float) -> tuple[datetime, datetime]:
    """One-point IngestRealtime calls, each stamped as it leaves; the first and last stamps."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        realtime = channel.unary_unary(
            REALTIME_METHOD,
            request_serializer=None,
            response_deserializer=ingest_pb2.IngestRealtimeResponse.FromString,
        )
        metadata = (("authorization", f"Bearer {token}"),)
        first = last = datetime.now(UTC)
        due = time.monotonic()
        pending = []
        for number in range(calls):
            well, parameter, unit, typical = tag_of(number)
            request = ingest_pb2.IngestRealtimeRequest()
            point = request.data_points.add(
                well_id=well, parameter_name=parameter, value=typical, unit=unit
            )
            last = datetime.now(UTC)
            if number == 0:
                first = last
            point.timestamp.FromDatetime(last)
            call = realtime(request.SerializeToString(), metadata=metadata)
            pending.append(asyncio.ensure_future(call))
            due += 1 / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        await asyncio.gather(*pending)
    return first, last


# --------------------------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class Figures:
    points: int
    latencies_s: list[float]

    def ms(self, q: int) -> float:
        return percentile(self.latencies_s, q) * 1000

    @property
    def max_ms(self) -> float:
        return max(self.latencies_s) * 1000


async def benchmark(args: argparse.Namespace, database_url: str, redis_url: str) -> dict[str, Any]:
    prefix = f"bench_{secrets.token_hex(3)}"
    tenant, raw_tenant = f"{prefix}_opcua", f"{prefix}_raw"
    with tempfile.TemporaryDirectory(prefix="wt-bench-opcua-") as data_dir:
        directory = Path(data_dir)
        config = gateway_config(data_dir)
        key = DevSigningKey.load_or_create(config.dev_key_file)  # before the child loads it
        # The issuer signs with the gateway's development key, which --dev trusts.
        issuer_dir = directory / "issuer"
        keys = key_directory(issuer_dir)
        keys.mkdir(mode=0o700, parents=True)
        shutil.copyfile(config.dev_key_file, keys / "current.pem")
        os.chmod(keys / "current.pem", 0o600)
        issuer = DevIssuer(
            config.model_copy(
                update={
                    "data_dir": issuer_dir,
                    "dev_issuer": DevIssuerConfig(
                        enabled=True, listen="127.0.0.1:0", issuer_url=DEV_ISSUER
                    ),
                }
            )
        )
        try:
            async with (
                gateway_process(data_dir, database_url, redis_url, [tenant, raw_tenant], None)
                as gateway,
                opcua_process(directory, args.tags, args.rate) as (opcua, server_certificate),
            ):
                progress(f"gateway pid {gateway.pid} on 127.0.0.1:{gateway.port}; OPC UA "
                         f"server pid {opcua.pid} on {opcua.endpoint}")
                pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
                try:
                    await issuer.start(pool)
                    credentials = await create_client(pool, tenant)
                    (directory / "agent").mkdir()
                    agent_file = write_agent_config(
                        directory / "agent" / "agent.yaml", tenant, gateway.port,
                        issuer.token_url, credentials.client_id, credentials.client_secret,
                        opcua, server_certificate, args,
                    )
                    agent = Agent(load_agent_config(agent_file), serve_endpoints=False)
                    await agent.start()
                    try:
                        await subscribed(agent, args.tags)
                        progress(f"subscribed; warm-up {args.warmup:g} s")
                        await opcua.write(args.warmup)
                        progress(f"measuring {args.seconds:g} s at {args.rate:g} Hz")
                        ticks, first, last = await opcua.write(args.seconds)
                        expected = ticks * args.tags
                        measured = Figures(
                            expected,
                            await stored_latencies(pool, tenant, first, last, expected),
                        )
                    finally:
                        await agent.stop()
                    progress(f"baseline: {args.baseline_calls} one-point IngestRealtime calls")
                    token = key.mint(raw_tenant, config.auth.audience, ttl_seconds=3600)
                    b_first, b_last = await baseline(
                        gateway.port, token, args.baseline_calls, args.rate
                    )
                    base = Figures(
                        args.baseline_calls,
                        await stored_latencies(
                            pool, raw_tenant, b_first, b_last, args.baseline_calls
                        ),
                    )
                finally:
                    await issuer.stop()
                    await pool.close()
        finally:
            progress("dropping the benchmark's tenants")
            await cleanup(database_url, redis_url, [tenant, raw_tenant])
    return report(args, measured, base)


def report(args: argparse.Namespace, measured: Figures, base: Figures) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "p50_ms": round(measured.ms(50), 1),
        "p99_ms": round(measured.ms(99), 1),
        "max_ms": round(measured.max_ms, 1),
        "points": measured.points,
        "baseline_p50_ms": round(base.ms(50), 1),
        "baseline_p99_ms": round(base.ms(99), 1),
        "baseline_points": base.points,
        "target_p99_ms": TARGET_P99_MS,
        "p99_within_target": measured.ms(99) < TARGET_P99_MS,
        "tags": args.tags,
        "rate_hz": args.rate,
        "publishing_interval": args.publishing_interval,
        "seconds": args.seconds,
    }
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"OPC UA source timestamp → stored row (ingested_at): {args.tags} tags changing at "
        f"{args.rate:g} Hz for {args.seconds:g} s, publishing interval {args.publishing_interval},"
        " SignAndEncrypt"
    )
    print(f"machine: {os.cpu_count()} cores, load average {load}")
    print(f"{'':44}{'points':>8}{'p50':>9}{'p99':>9}{'max':>9}")
    print(f"{'':44}{'':>8}{'ms':>9}{'ms':>9}{'ms':>9}")
    for label, figure in (
        ("OPC UA → agent → gateway → PostgreSQL", measured),
        ("baseline: 1-point IngestRealtime → PostgreSQL", base),
    ):
        print(
            f"{label:44}{figure.points:>8,}{figure.ms(50):>9.1f}{figure.ms(99):>9.1f}"
            f"{figure.max_ms:>9.1f}"
        )
    verdict = "within" if figures["p99_within_target"] else "OVER"
    print(f"target: p99 < {TARGET_P99_MS:.0f} ms: {verdict}")
    return figures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tags", type=positive_int, default=4, help="variables (default 4)")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="changes per second per tag (default 100)"
    )
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="measured seconds (default 15)"
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="unmeasured seconds first (default 3)"
    )
    parser.add_argument(
        "--publishing-interval",
        default="500ms",
        help="the subscription's publishing interval (default 500ms, the collector's default)",
    )
    parser.add_argument(
        "--baseline-calls",
        type=positive_int,
        default=300,
        help="one-point IngestRealtime calls of the baseline (default 300)",
    )
    add_server_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.warmup < 0:
        raise SystemExit("--rate and --seconds must be more than 0, --warmup at least 0")
    return run_benchmark(benchmark, args)


if __name__ == "__main__":
    sys.exit(main())
