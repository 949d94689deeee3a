"""deploy/opcua-simulator/well_simulator.py, the docker-compose stack's OPC UA well simulator, run
as the compose service runs it (the script, as a process, with its --endpoint flag) on a free
loopback port, and read with the agent's own ``opcua`` collector configured as the stack's agent
is (deploy/agent/config.yaml): every tag readable, with its unit from the node's
EngineeringUnits; the values those of the agent's simulator; a gap filled from the server's
history; and, with a certificate, Basic256Sha256 SignAndEncrypt."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.collectors.opcua import OpcUaCollector, OpcUaConfig
from edge.collectors.simulator import SIMULATED_PARAMETERS, Simulator, SimulatorConfig
from edge.config import load_agent_config
from edge.readings import Quality
from tests.collector_support import MemorySink, free_port, running
from tests.unit.test_compose import AGENT_CONFIG, agent_environment, load_well_simulator

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "deploy" / "opcua-simulator" / "well_simulator.py"

pytestmark = pytest.mark.slow


class ScriptServer:
    """The script as a process, listening on ``127.0.0.1:port``."""

    def __init__(self, port: int, extra: Sequence[str] = ()) -> None:
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/"
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--endpoint", self.endpoint, *extra],
            cwd="/",  # the script needs nothing of the working directory
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Until the port accepts a connection, as the compose health check asks."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the simulator exited:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        f"not listening after {timeout}s:\n{self.output()}"
                    ) from None
                time.sleep(0.1)

    def output(self) -> str:
        if self.process.poll() is None:
            return "(running)"
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def stop(self) -> int:
        """SIGTERM, as ``docker compose stop`` sends; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start(extra: Sequence[str] = ()) -> ScriptServer:
    server = ScriptServer(free_port(), extra)
    server.wait_listening()
    return server


@pytest.fixture(scope="module")
def simulator_server() -> Iterator[ScriptServer]:
    server = start()
    try:
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"the simulator did not stop cleanly ({status}):\n{server.output()}"


def compose_source(endpoint: str, **connection: object) -> OpcUaConfig:
    """The opcua source of deploy/agent/config.yaml, pointed at ``endpoint``."""
    (source,) = load_agent_config(AGENT_CONFIG, agent_environment()).data_sources
    assert isinstance(source, OpcUaConfig)
    data = source.model_dump(mode="json", exclude_unset=True)
    data["connection"] = {**data["connection"], "endpoint": endpoint, **connection}
    data["publishing_interval"] = "100ms"
    return OpcUaConfig.model_validate(data)


async def test_every_configured_tag_is_readable(simulator_server: ScriptServer) -> None:
    source = compose_source(simulator_server.endpoint)
    assert len(source.tags) == len(load_well_simulator().node_ids()) == 12
    found = await source.build().probe()
    assert found == (
        f"{simulator_server.endpoint}: no security, anonymous; server WellTegra OPC UA well "
        "simulator 0.1.0 (Running); 12 tags readable"
    )


def series(sink: MemorySink) -> dict[str, list[datetime]]:
    """Each tag's distinct source timestamps, in order."""
    found: dict[str, set[datetime]] = {}
    for reading in sink.readings:
        assert reading.tag is not None
        found.setdefault(reading.tag, set()).add(reading.timestamp)
    return {tag: sorted(stamps) for tag, stamps in found.items()}


async def collect_until(sink: MemorySink, source: OpcUaConfig, ticks: int) -> None:
    """Run the collector until every tag has ``ticks`` more distinct timestamps."""
    before = {tag: len(stamps) for tag, stamps in series(sink).items()}
    collector = source.build()
    assert isinstance(collector, OpcUaCollector)
    async with running(collector, sink, tolerate=()):
        deadline = time.monotonic() + ticks + 15
        while True:
            now = series(sink)
            if len(now) == len(source.tags) and all(
                len(stamps) >= before.get(tag, 0) + ticks for tag, stamps in now.items()
            ):
                break
            assert time.monotonic() < deadline, f"too few readings: {now}"
            await asyncio.sleep(0.1)
    # What history and the subscription both gave is sent once ("repeated"); nothing else is
    # set aside.
    assert set(collector.counts) <= {"repeated"}, collector.counts


async def test_values_units_and_backfill(simulator_server: ScriptServer) -> None:
    source = compose_source(simulator_server.endpoint)
    sink = MemorySink()
    await collect_until(sink, source, ticks=2)
    first_stop = max(r.timestamp for r in sink.readings)
    # The agent is away for a few seconds; when it is back, history fills the gap.
    await asyncio.sleep(3)
    await collect_until(sink, source, ticks=1)

    by_tag = series(sink)
    assert len(sink.readings) == sum(len(stamps) for stamps in by_tag.values()), "duplicates"
    for tag, stamps in by_tag.items():
        # One reading a second, none missing: the seconds while the collector was away came
        # from the server's history.
        steps = {b - a for a, b in itertools.pairwise(stamps)}
        assert steps == {timedelta(seconds=1)}, (tag, stamps)
        assert stamps[-1] - first_stop >= timedelta(seconds=3), (tag, first_stop, stamps)

    # The values and units are the agent's simulator's, exactly; BAD ones arrive as BAD.
    simulator = Simulator(SimulatorConfig(name="check", wells=("WELL-001", "WELL-002", "WELL-003")))
    tags = {t.node_id: t for t in load_well_simulator().simulated_tags()}
    for reading in sink.readings:
        tag = tags[reading.tag or ""]
        assert (reading.well_id, reading.parameter) == (tag.well_id, tag.parameter)
        assert reading.unit == SIMULATED_PARAMETERS[reading.parameter]
        (expected,) = [
            r
            for r in simulator.readings_at(simulator.tick_of(reading.timestamp))
            if (r.well_id, r.parameter) == (reading.well_id, reading.parameter)
        ]
        assert expected.timestamp == reading.timestamp
        assert reading.quality is expected.quality
        if expected.quality is Quality.GOOD:
            assert reading.value == expected.value


def server_certificate(directory: Path) -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        "WellTegra OPC UA well simulator",
        {},
        [
            x509.UniformResourceIdentifier("urn:welltegra:opcua-well-simulator"),
            x509.DNSName("localhost"),
        ],
        [ExtendedKeyUsageOID.SERVER_AUTH],
        days=30,
    )
    certificate_path, key_path = directory / "server.der", directory / "server.key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return certificate_path, key_path


async def test_sign_and_encrypt_with_a_certificate(tmp_path: Path) -> None:
    certificate, key = server_certificate(tmp_path)
    server = start(["--certificate", str(certificate), "--private-key", str(key)])
    try:
        source = compose_source(
            server.endpoint,
            security_mode="SignAndEncrypt",
            security_policy="Basic256Sha256",
            server_certificate=str(certificate),
            certificate_dir=str(tmp_path / "agent-pki"),
        )
        found = await source.build().probe()
        assert "Basic256Sha256/SignAndEncrypt" in found and found.endswith("12 tags readable")
        # Security None is still offered, as in the compose stack.
        assert (await compose_source(server.endpoint).build().probe()).endswith("12 tags readable")
    finally:
        assert server.stop() == 0, server.output()
