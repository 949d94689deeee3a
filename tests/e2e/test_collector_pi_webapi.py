"""The ``pi_webapi`` collector end to end: a PI Web API look-alike over HTTPS → the agent
(transform, buffer, uploader) → a real gateway process → PostgreSQL, counted point for point
through current values, update markers, an expired marker (recorded fallback) and an agent
restart (backfill from the watermarks, paged under a small item cap)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.agent import Agent
from edge.config import load_agent_config
from ingest_service.dev_issuer import ClientCredentials
from tests.pi_webapi_server import PiWebApiServer

from .stack import GatewayServer, Identity, agent_config, stored_points, wait_for

pytestmark = pytest.mark.slow

# PI path → (well, parameter, PI's engineering units).
TAGS = {
    "\\\\PISRV\\WH-001.PT-101": ("PI-WELL-1", "wellhead_pressure", "psi"),
    "\\\\PISRV\\WH-001.WT-201": ("PI-WELL-1", "hookload", "klbs"),
    "\\\\PISRV\\WH-002.TT-301": ("PI-WELL-2", "downhole_temperature", "degC"),
}
SHUTDOWN = {"Name": "Shutdown", "Value": 254, "IsSystem": True}


class History:
    """What the look-alike holds, and so which points the gateway must end up with."""

    def __init__(self, pi: PiWebApiServer) -> None:
        self.pi = pi
        self.base = datetime.now(UTC).replace(microsecond=250_000) - timedelta(minutes=30)
        self.expected: set[Identity] = set()

    def at(self, i: int) -> datetime:
        return self.base + timedelta(seconds=i, microseconds=37 * i)

    def record(self, first: int, last: int, *, expect: bool = True) -> None:
        """Values ``first`` to ``last`` of every tag; the pressure tag is shut down at every
        tenth, a digital state that is not a number and is never stored."""
        for i in range(first, last + 1):
            for path, (well, parameter, _) in TAGS.items():
                digital = parameter == "wellhead_pressure" and i % 10 == 0
                value: Any = SHUTDOWN if digital else 100.0 + i
                self.pi.record(path, self.at(i), value, good=not digital)
                if expect and not digital:
                    self.expected.add((well, parameter, self.at(i)))


async def test_pi_values_reach_postgres_once_each_through_markers_expiry_and_restart(
    tmp_path: Path, server: GatewayServer, tenant: str, client: ClientCredentials,
    database_url: str,
) -> None:
    pi = PiWebApiServer(tmp_path / "pi", max_items=10)
    await pi.start()
    for path, (_, _, units) in TAGS.items():
        pi.add_point(path, units)
    history = History(pi)
    config = agent_config(
        tmp_path / "agent.yaml", server, tenant, client.client_id, client.client_secret
    )
    settings = yaml.safe_load(config.read_text())
    settings["data_sources"] = [
        {
            "name": "pi",
            "type": "pi_webapi",
            "base_url": pi.base_url,
            "username": pi.username,
            "password": "${PI_PASSWORD}",
            "ca_file": str(pi.certificate),
            "poll_interval": "100ms",
            "max_recorded_per_request": 10,
            "tags": [
                {"path": path, "well_id": well, "parameter": parameter}
                for path, (well, parameter, _) in TAGS.items()
            ],
        }
    ]
    config.write_text(yaml.safe_dump(settings))
    environ = {"PI_PASSWORD": pi.password}

    async def stored() -> set[Identity]:
        return set(await stored_points(database_url, tenant))

    async def all_stored() -> bool:
        return len(await stored()) >= len(history.expected)

    try:
        # History before the first start: only each tag's current value is read.
        history.record(0, 3, expect=False)
        history.record(4, 4)
        agent = Agent(load_agent_config(config, environ=environ), serve_endpoints=False)
        await agent.start()
        try:
            await wait_for(all_stored, timeout=60)
            # New values, through the update markers.
            history.record(5, 34)
            await wait_for(all_stored, timeout=60)
            assert pi.count("GET recorded") == 0
            # PI forgets the markers: the values since come from recorded reads.
            pi.expire_markers()
            history.record(35, 64)
            await wait_for(all_stored, timeout=60)
            assert pi.count("GET recorded") >= 3
            assert pi.count("POST streamsets/updates") == 2
        finally:
            await agent.stop()
        # While the agent is down; the restart backfills from its watermarks, 10 at a time.
        history.record(65, 104)
        recorded_before = pi.count("GET recorded")
        agent = Agent(load_agent_config(config, environ=environ), serve_endpoints=False)
        await agent.start()
        try:
            await wait_for(all_stored, timeout=60)
        finally:
            await agent.stop()
        assert pi.count("GET recorded") - recorded_before >= 3 * 40 // 10
    finally:
        await pi.stop()

    points = await stored_points(database_url, tenant)
    assert len(points) == len(set(points))
    assert set(points) == history.expected  # nothing missing, nothing extra
    # 3 tags × 101 values (4 to 104), less the pressure tag's 10 shutdown states.
    assert len(points) == 3 * 101 - 10
