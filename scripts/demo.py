"""The demo behind `make demo`: the gateway on an embedded PostgreSQL and Redis with Envoy in
front (TLS 1.3), a tenant, a development token, an agent's batches over gRPC and a REST call,
both through Envoy as in production, and what was stored.

Everything runs through the same commands a user types (`welltegra-ingest serve`, `tenants
create`, `token mint`); only the client calls and the final read are done from here.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import httpx
from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.embedded import EmbeddedPostgres
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

DATA_DIR = Path(".welltegra/demo")
TENANT = "operator_demo"
CLI = [sys.executable, "-m", "ingest_service.cli"]
# Demo runs on the embedded servers even where DATABASE_URL / REDIS_URL are set.
ENV = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}


def cli(*args: str) -> str:
    result = subprocess.run(
        [*CLI, *args, "--data-dir", str(DATA_DIR)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        sys.exit(f"demo: `welltegra-ingest {' '.join(args)}` failed:\n{result.stderr}")
    return result.stdout.strip()


def reading(
    well: str, parameter: str, unit: str, value: float, at: datetime
) -> ingest_pb2.DataPoint:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ingest_pb2.DataPoint(
        well_id=well,
        timestamp=ts,
        parameter_name=parameter,
        value=value,
        unit=unit,
        quality_code="GOOD",
        source="DEMO_SIMULATOR",
    )


def batches(start: datetime) -> list[ingest_pb2.IngestRequest]:
    """Three sealed batches of one-second readings from two wells, in field units. Each demo run
    is a new agent, so its batch sequence starts again at 1."""
    agent_id = f"demo-agent-{start:%Y%m%d%H%M%S}"
    out = []
    for seq in range(1, 4):
        points = []
        for i in range(200):
            at = start + timedelta(seconds=(seq - 1) * 200 + i)
            wave = math.sin(i / 20)
            points.append(reading("WELL_001", "wellhead_pressure", "bar", 460 + 5 * wave, at))
            points.append(reading("WELL_002", "downhole_temperature", "degC", 120 + wave, at))
        out.append(
            ingest_pb2.IngestRequest(agent_id=agent_id, batch_sequence=seq, data_points=points)
        )
    return out


async def send_grpc(front: str, certificate: bytes, token: str) -> None:
    """What an edge agent does: sealed batches over one TLS gRPC stream, through Envoy."""
    metadata = (("authorization", f"Bearer {token}"),)
    sealed = batches(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10))

    async def stream() -> AsyncIterator[ingest_pb2.IngestRequest]:
        for batch in sealed:
            yield batch

    credentials = grpc.ssl_channel_credentials(certificate)
    async with grpc.aio.secure_channel(front, credentials) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response = await stub.Ingest(stream(), metadata=metadata)
        print(
            f"gRPC Ingest stream: {len(response.batches)} batches,"
            f" accepted {response.accepted_count}, duplicates {response.duplicate_count}"
        )
        resent = await stub.Ingest(stream(), metadata=metadata)
        print(
            f"Same stream resent: accepted {resent.accepted_count},"
            f" duplicates {resent.duplicate_count} (nothing stored twice)"
        )


def send_rest(front: str, certificate: Path, token: str) -> None:
    """What a REST client does: the documented JSON, POST /v1/ingest/realtime, TLS 1.3."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    payload = {
        "tenant_id": TENANT,
        "data_points": [
            {
                "well_id": "WELL_001",
                "timestamp": now,
                "parameter_name": "hookload",
                "value": 215.5,
                "unit": "klbs",
                "quality_code": "GOOD",
                "source": "SCADA_OPC_UA",
            },
            {
                "well_id": "WELL_001",
                "timestamp": now,
                "parameter_name": "wellhead_pressure",
                "value": 99_999,
                "unit": "psi",
            },
        ],
    }
    context = ssl.create_default_context(cafile=str(certificate))
    with httpx.Client(base_url=f"https://{front}", verify=context, timeout=30) as client:
        answer = client.post(
            "/v1/ingest/realtime", json=payload, headers={"authorization": f"Bearer {token}"}
        )
        print(f"REST POST /v1/ingest/realtime -> {answer.status_code} {answer.text}")
        refused = client.post("/v1/ingest/realtime", json=payload)
        print(f"REST without a token -> {refused.status_code} {refused.text}")


def show_stored() -> None:
    """What was stored, read back the way an operator does: decrypted by `welltegra-ingest
    query` (the ingest API has no way to read data back)."""
    points = [
        json.loads(line)
        for line in cli("query", "--tenant", TENANT, "--format", "json").splitlines()
    ]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for p in points:
        groups.setdefault((p["well_id"], p["parameter_name"], p["unit"]), []).append(p["value"])
    print(f"\nStored for {TENANT}, decrypted by `welltegra-ingest query` (canonical units):")
    header = ("well", "parameter", "unit", "points", "min", "max")
    print("  {:<9} {:<21} {:<8} {:>6} {:>9} {:>9}".format(*header))
    for (well, parameter, unit), values in sorted(groups.items()):
        print(
            f"  {well:<9} {parameter:<21} {unit:<8} {len(values):>6}"
            f" {min(values):>9.1f} {max(values):>9.1f}"
        )


async def show_ciphertext(database_url: str) -> None:
    """The same rows as PostgreSQL holds them: values sealed with the tenant's own key."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            f"SELECT well_id, parameter_name, ts, key_version, sealed"
            f" FROM {TENANT}_streams.real_time_parameters ORDER BY ts DESC LIMIT 1"
        )
        quarantined = await conn.fetchval(f"SELECT count(*) FROM {TENANT}_streams.quarantine")
        audited = await conn.fetchval(
            "SELECT count(*) FROM system_monitoring.audit_log WHERE tenant_id = $1", TENANT
        )
    finally:
        await conn.close()
    print(
        f"\nIn PostgreSQL the value is ciphertext: {row['well_id']} {row['parameter_name']}"
        f" {row['ts']:%H:%M:%S} key v{row['key_version']} sealed={row['sealed'][:24].hex()}..."
    )
    print(f"Quarantined points: {quarantined}; audit rows for {TENANT}: {audited}")


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    print(f"Starting the gateway on an embedded PostgreSQL and Redis in {DATA_DIR} ...")
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--dev",
            "--data-dir",
            str(DATA_DIR),
            "--grpc-listen",
            "127.0.0.1:0",
            "--envoy-listen",
            "127.0.0.1:8443",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        gateway = re.search(r"serving gRPC on (\S+)", server.stdout.readline())
        front = re.search(r"over TLS 1.3 on (\S+) \(certificate (.+)\)", server.stdout.readline())
        if not (gateway and front):
            sys.exit("demo: the gateway did not start; see the lines above")
        address, certificate = front.group(1), Path(front.group(2))
        print(f"Gateway serving gRPC on {gateway.group(1)}; Envoy in front on {address}")
        print(cli("tenants", "create", TENANT))
        token = cli("token", "mint", "--tenant", TENANT, "--ttl", "10m")
        print(f"Development token minted for {TENANT} (scope api:ingest, 10 minutes)\n")
        asyncio.run(send_grpc(address, certificate.read_bytes(), token))
        send_rest(address, certificate, token)
        postgres = EmbeddedPostgres(DATA_DIR)  # attaches to the server `serve` started
        show_stored()
        asyncio.run(show_ciphertext(postgres.start()))
        postgres.stop()
        print(
            "\nWhile a gateway runs (make serve), try:\n"
            f"  curl --cacert {certificate} https://localhost:8443/v1/ingest/realtime -d '{{}}'\n"
            f"  .venv/bin/grpcurl -cacert {certificate} localhost:8443 list"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    print("Gateway stopped; the embedded servers stopped with it.")


if __name__ == "__main__":
    main()
