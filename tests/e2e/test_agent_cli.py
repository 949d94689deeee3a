"""``welltegra-agent`` as a user runs it: check-config, test-connections, run (with /health,
/ready and /metrics over HTTP, stopped by SIGTERM), and the buffer commands."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from ingest_service.dev_issuer import ClientCredentials

from .stack import AGENT, ROOT, GatewayServer, agent_config, free_port, run_agent, wait_for

pytestmark = pytest.mark.slow


async def agent_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *AGENT, *args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_config_summarises_without_the_secret(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret
    )
    code, out, _ = await agent_cli("check-config", "-c", str(config))
    assert code == 0
    assert tenant in out and server.target in out and "sim" in out
    assert client.client_secret not in out

    broken = tmp_path / "broken.yaml"
    data = yaml.safe_load(config.read_text())
    data["buffer"]["linger"] = "soon"
    data["api"]["flush_interval"] = 60
    broken.write_text(yaml.safe_dump(data))
    code, _, err = await agent_cli("check-config", "-c", str(broken))
    assert code == 2
    assert "broken.yaml: buffer.linger:" in err
    assert "api.flush_interval" in err


async def test_test_connections_says_per_part_ok_or_why_not(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials
) -> None:
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret
    )
    code, out, _ = await agent_cli("test-connections", "-c", str(config))
    assert code == 0, out
    assert re.search(r"oauth token\s+ok", out)
    assert re.search(r"gateway\s+ok", out)
    assert re.search(r"source sim\s+ok\s+simulating 3 wells", out)

    wrong = agent_config(
        tmp_path / "wrong.yaml", server, tenant, client.client_id, "wrong-secret",
        api={"grpc_target": f"127.0.0.1:{free_port()}"},
    )
    code, out, _ = await agent_cli("test-connections", "-c", str(wrong))
    assert code == 1
    assert re.search(r"oauth token\s+FAILED.*invalid_client", out)
    assert re.search(r"gateway\s+FAILED.*UNAVAILABLE", out)
    assert "wrong-secret" not in out


async def test_run_serves_health_and_metrics_and_stops_on_sigterm(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials
) -> None:
    health_port, metrics_port = free_port(), free_port()
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret
    )
    data = yaml.safe_load(config.read_text())
    data["monitoring"] = {"health_check_port": health_port, "prometheus_metrics_port": metrics_port}
    config.write_text(yaml.safe_dump(data))
    process = await run_agent(config)
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def sent_some() -> bool:
                try:
                    text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                except httpx.TransportError:
                    return False
                found = re.search(
                    rf'ingestion_data_points_sent_total\{{tenant_id="{tenant}"\}} (\S+)', text
                )
                return found is not None and float(found.group(1)) > 0

            await wait_for(sent_some, timeout=60)
            health = await http.get(f"http://127.0.0.1:{health_port}/health")
            assert health.status_code == 200 and health.json()["status"] == "healthy"
            ready = await http.get(f"http://127.0.0.1:{health_port}/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["buffer_writable"] is True
            metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            for name in (
                "ingestion_data_points_collected_total",
                "ingestion_buffer_size_bytes",
                "ingestion_api_request_duration_seconds_bucket",
                "ingestion_collector_up",
            ):
                assert name in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0
    log = (tmp_path / "agent.log").read_text()
    assert client.client_secret not in log


async def test_buffer_commands_report_check_and_export(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials
) -> None:
    # Collect with the gateway away, so the buffer holds batches to show.
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret,
        api={"grpc_target": f"127.0.0.1:{free_port()}"}, rate=50,
    )
    process = await run_agent(config)

    async def has_batches() -> bool:
        code, out, _ = await agent_cli("buffer", "stats", "-c", str(config), "--json")
        return code == 0 and json.loads(out)["pending_batches"] >= 2

    try:
        await wait_for(has_batches, timeout=60, interval=1)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=60)

    code, out, _ = await agent_cli("buffer", "stats", "-c", str(config), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["pending_points"] > 0 and stats["bytes_per_point"] > 0
    code, out, _ = await agent_cli("buffer", "stats", "-c", str(config))
    assert "pending" in out and "bytes/point" in out

    code, out, _ = await agent_cli("buffer", "export", "-c", str(config))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == stats["pending_batches"]
    exported = sum(len(line["request"].get("data_points", [])) for line in lines)
    assert exported == stats["pending_points"]
    assert lines[0]["request"]["tenant_id"] == tenant

    code, out, _ = await agent_cli("buffer", "check", "-c", str(config))
    assert code == 0 and "integrity: ok" in out
