"""The demo behind `make demo`: the whole path on an embedded PostgreSQL and Redis.

The gateway with its development OAuth issuer and Envoy in front (TLS 1.3), a tenant and an
OAuth client, then the edge agent: simulated wells → buffer → gRPC through Envoy → PostgreSQL,
with a live view of what is collected, buffered, sent and stored. At the end the agent drains
and the stored rows are counted against what it collected. A REST call through Envoy and the
ciphertext PostgreSQL holds close the tour.

Everything server-side runs through the commands a user types (`welltegra-ingest serve`,
`tenants create`, `clients create`); the agent is the same `Agent` `welltegra-agent run` runs.
DEMO_SECONDS (default 20) sets how long the agent collects.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import yaml

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.embedded import EmbeddedPostgres

DATA_DIR = Path(".welltegra/demo")
AGENT_DIR = DATA_DIR / "agent"
TENANT = "operator_demo"
WELLS = ["WELL-001", "WELL-002", "WELL-003"]
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


def agent_config(front: str, certificate: Path, client_id: str, secret: str) -> Path:
    """A site's config.yaml: three simulated wells, the gateway through Envoy over TLS."""
    port = front.rpartition(":")[2]
    config = {
        "tenant": {"id": TENANT, "name": "Demo operator"},
        "api": {"grpc_target": f"localhost:{port}", "tls": {"ca_file": str(certificate)}},
        "oauth": {
            "token_url": f"https://localhost:{port}/oauth/token",
            "client_id": client_id,
            "client_secret": "${DEMO_CLIENT_SECRET}",
            "ca_file": str(certificate),
        },
        "data_sources": [
            {
                "name": "wellsite_sim",
                "type": "simulator",
                "wells": WELLS,
                "rate": 5,
                "units": {"downhole_temperature": "degC"},
            }
        ],
        "buffer": {"database_path": str(AGENT_DIR / "buffer.db")},
        "logging": {"level": "WARNING", "file": str(AGENT_DIR / "agent.log")},
        "monitoring": {"health_check_port": 0, "prometheus_metrics_port": 0},
    }
    path = AGENT_DIR / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    os.environ["DEMO_CLIENT_SECRET"] = secret  # the secret stays out of the file
    return path


async def stored_by(conn: asyncpg.Connection, agent_id: str) -> tuple[int, list[float]]:
    """Rows this agent stored, and the latency (read → stored, s) of the last few seconds'."""
    table = f"{TENANT}_streams.real_time_parameters"
    count = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE agent_id = $1", agent_id)
    latencies = await conn.fetch(
        f"SELECT extract(epoch FROM ingested_at - ts) AS s FROM {table}"
        " WHERE agent_id = $1 AND ingested_at > now() - interval '3 seconds'",
        agent_id,
    )
    return int(count), sorted(float(r["s"]) for r in latencies)


def percentile_ms(values: list[float], q: float) -> str:
    if not values:
        return "   -"
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:4.0f}"


def oauth_token(front: str, certificate: Path, credentials: dict[str, str]) -> str:
    """What a REST client does first: the client-credentials grant, through Envoy."""
    port = front.rpartition(":")[2]
    context = ssl.create_default_context(cafile=str(certificate))
    answer = httpx.post(
        f"https://localhost:{port}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "audience": "https://api.welltegra.com",
            **credentials,
        },
        verify=context,
        timeout=30,
    )
    answer.raise_for_status()
    return str(answer.json()["access_token"])


async def run_agent(config_path: Path, database_url: str, seconds: float) -> None:
    agent = Agent(load_agent_config(config_path))
    await agent.start()
    assert agent.buffer is not None and agent.health is not None
    agent_id, metrics = agent.buffer.agent_id, agent.metrics
    print(
        f"\nAgent {agent_id}: 3 wells × 4 parameters at 5 Hz (60 points/s),"
        f" health http://127.0.0.1:{agent.health.port}/ready,"
        f" metrics http://127.0.0.1:{agent.metrics_port}/metrics"
    )
    print(
        f"  {'time':>4}  {'collected':>9} {'buffered':>8} {'sent':>7} {'stored':>7}"
        f" {'rejected':>8}  latency p50 / p99"
    )
    conn = await asyncpg.connect(database_url)
    try:
        started = time.monotonic()

        async def line(label: str) -> int:
            stats = await agent.buffer.stats()  # type: ignore[union-attr]
            stored, latencies = await stored_by(conn, agent_id)
            collected = metrics.value(
                "ingestion_data_points_collected_total", source="wellsite_sim", tenant_id=TENANT
            )
            sent = metrics.value("ingestion_data_points_sent_total", tenant_id=TENANT)
            failed = metrics.value("ingestion_data_points_failed_total", tenant_id=TENANT)
            print(
                f"  {label:>4}  {collected:>9.0f} {stats.pending_points:>8} {sent:>7.0f}"
                f" {stored:>7} {failed:>8.0f}  {percentile_ms(latencies, 0.5):>6} ms"
                f" / {percentile_ms(latencies, 0.99)} ms",
                flush=True,
            )
            return stored

        while time.monotonic() - started < seconds:
            await asyncio.sleep(2)
            await line(f"{time.monotonic() - started:.0f}s")
        await agent.stop_collecting()
        while (await agent.buffer.stats()).pending_batches:  # noqa: ASYNC110 (a poll of the file)
            await asyncio.sleep(0.5)
        stored = await line("done")
        collected = metrics.value(
            "ingestion_data_points_collected_total", source="wellsite_sim", tenant_id=TENANT
        )
        accepted, rejected = await conn.fetchrow(
            f"SELECT coalesce(sum(accepted_count), 0), coalesce(sum(rejected_count), 0)"
            f" FROM {TENANT}_streams.batch_ledger WHERE agent_id = $1",
            agent_id,
        )
    finally:
        await conn.close()
        await agent.stop()
    verdict = "match" if collected == stored + rejected and stored == accepted else "DIFFER"
    print(
        f"\nCollected {collected:.0f} points; PostgreSQL stored {stored} and quarantined"
        f" {rejected} out-of-range ones: {verdict}."
    )
    if verdict != "match":
        sys.exit("demo: the counts differ")


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
    shutil.rmtree(AGENT_DIR, ignore_errors=True)  # a fresh agent (and buffer) per demo
    AGENT_DIR.mkdir(parents=True)
    print(f"Starting the gateway on an embedded PostgreSQL and Redis in {DATA_DIR} ...")
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--dev",
            "--dev-issuer",
            "--data-dir",
            str(DATA_DIR),
            "--grpc-listen",
            "127.0.0.1:0",
            "--dev-issuer-listen",
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
        started = "".join(server.stdout.readline() for _ in range(3))
        gateway = re.search(r"serving gRPC on (\S+)", started)
        front = re.search(r"over TLS 1.3 on (\S+) \(certificate (.+)\)", started)
        if not (gateway and front):
            sys.exit("demo: the gateway did not start; see the lines above")
        address, certificate = front.group(1), Path(front.group(2))
        print(f"Gateway serving gRPC on {gateway.group(1)}; Envoy in front on {address}")
        print(cli("tenants", "create", TENANT))
        credentials = dict(
            line.split(": ", 1)
            for line in cli("clients", "create", "--tenant", TENANT).splitlines()
        )
        print(f"OAuth client {credentials['client_id']} registered for {TENANT}")
        config = agent_config(
            address, certificate, credentials["client_id"], credentials["client_secret"]
        )
        postgres = EmbeddedPostgres(DATA_DIR)  # attaches to the server `serve` started
        database_url = postgres.start()
        seconds = float(os.environ.get("DEMO_SECONDS", "20"))
        asyncio.run(run_agent(config, database_url, seconds))
        send_rest(address, certificate, oauth_token(address, certificate, credentials))
        show_stored()
        asyncio.run(show_ciphertext(database_url))
        postgres.stop()
        print(
            f"\nThe agent's config is {config}. While a gateway runs (make serve), try:\n"
            f"  curl --cacert {certificate} https://localhost:8443/v1/ingest/realtime -d '{{}}'\n"
            f"  .venv/bin/grpcurl -cacert {certificate} localhost:8443 list"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    print("Gateway stopped; the embedded servers stopped with it.")


if __name__ == "__main__":
    main()
