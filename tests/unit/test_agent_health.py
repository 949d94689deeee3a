"""The agent's /health and /ready over real HTTP on a free loopback port: bodies, status codes,
methods, and clients that send garbage, too much, or nothing at all."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from edge.health import HealthServer, HealthServerError, Readiness

READ_TIMEOUT = 0.5


class Probe:
    """A readiness the test sets, counting how often it is asked."""

    def __init__(self) -> None:
        self.answer = Readiness(ready=True, checks={"buffer_writable": True})
        self.error: Exception | None = None
        self.delay = 0.0
        self.calls = 0

    async def __call__(self) -> Readiness:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[HealthServer]:
    health = HealthServer(
        "127.0.0.1", 0, probe, read_timeout=READ_TIMEOUT, readiness_timeout=0.3, max_connections=8
    )
    await health.start()
    yield health
    await health.stop()


@pytest.fixture
async def http(server: HealthServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        yield client


async def raw(server: HealthServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def test_health_says_healthy_with_an_rfc3339_utc_timestamp(http: httpx.AsyncClient) -> None:
    response = await http.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"status", "timestamp"} and body["status"] == "healthy"
    assert body["timestamp"].endswith("Z")
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(stamp.timestamp() - time.time()) < 5
    assert (await http.get("/health?verbose=1")).status_code == 200


async def test_ready_follows_the_readiness(http: httpx.AsyncClient, probe: Probe) -> None:
    probe.answer = Readiness(
        ready=True, checks={"buffer_writable": True, "last_upload_success_age_seconds": 3.2}
    )
    response = await http.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"buffer_writable": True, "last_upload_success_age_seconds": 3.2},
    }
    probe.answer = Readiness(ready=False, checks={"buffer_writable": False})
    response = await http.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "not_ready", "checks": {"buffer_writable": False}}
    assert probe.calls == 2
    assert (await http.get("/health")).status_code == 200  # alive, though not ready


async def test_checks_that_are_not_json_are_shown_as_json(
    http: httpx.AsyncClient, probe: Probe
) -> None:
    moment = datetime(2025, 11, 6, 14, 30, tzinfo=UTC)
    probe.answer = Readiness(
        ready=True, checks={"age": math.inf, "nan": math.nan, "at": moment, "ids": (1, 2)}
    )
    response = await http.get("/ready")
    assert response.status_code == 200
    checks = json.loads(response.content)["checks"]  # strict JSON: no NaN or Infinity
    assert checks == {"age": None, "nan": None, "at": str(moment), "ids": [1, 2]}


@pytest.mark.parametrize("failure", ["raises", "too slow", "wrong type"])
async def test_a_failing_readiness_means_not_ready(
    http: httpx.AsyncClient, probe: Probe, failure: str
) -> None:
    if failure == "raises":
        probe.error = RuntimeError("buffer is locked")
    elif failure == "too slow":
        probe.delay = 2.0
    else:
        probe.answer = {"ready": True}  # type: ignore[assignment]
    started = time.monotonic()
    response = await http.get("/ready")
    assert time.monotonic() - started < 1.5
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["error"].startswith("the readiness check failed")
    if failure == "raises":
        assert "buffer is locked" in body["checks"]["error"]
    assert (await http.get("/health")).status_code == 200


async def test_unknown_paths_and_other_methods(http: httpx.AsyncClient) -> None:
    for path in ("/", "/healthz", "/metrics", "/health/", "/ready/x"):
        response = await http.get(path)
        assert response.status_code == 404, path
        assert "error" in response.json()
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        for path in ("/health", "/ready"):
            response = await http.request(method, path, content=b"{}")
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == "GET, HEAD"
    assert (await http.post("/nowhere")).status_code == 404


async def test_head_is_get_without_the_body(http: httpx.AsyncClient, probe: Probe) -> None:
    get = await http.get("/health")
    head = await http.head("/health")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert int(head.headers["content-length"]) == len(get.content)
    probe.answer = Readiness(ready=False)
    head = await http.head("/ready")
    assert head.status_code == 503 and head.content == b""
    assert (await http.get("/health")).status_code == 200  # the connection is still usable


async def test_keep_alive_serves_many_requests_on_one_connection(server: HealthServer) -> None:
    reader, writer = await raw(server)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" * 3)
        await writer.drain()
        received = b""
        async with asyncio.timeout(5):
            while received.count(b"HTTP/1.1 200") < 3:
                received += await reader.read(4096)
    finally:
        writer.close()


async def test_garbage_gets_a_400_and_others_are_served(
    server: HealthServer, http: httpx.AsyncClient
) -> None:
    reader, writer = await raw(server)
    try:
        writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()  # the server answers, then closes
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert (await http.get("/health")).status_code == 200


async def test_oversized_headers_and_bodies_are_refused(
    server: HealthServer, http: httpx.AsyncClient
) -> None:
    reader, writer = await raw(server)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    response = await http.request("GET", "/health", content=b"a" * 100_000)
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert (await http.get("/health")).status_code == 200


async def test_a_stalled_client_holds_nothing(
    server: HealthServer, http: httpx.AsyncClient
) -> None:
    silent_reader, silent_writer = await raw(server)  # connects and says nothing
    slow_reader, slow_writer = await raw(server)
    slow_writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # and never ends its headers
    await slow_writer.drain()
    try:
        started = time.monotonic()
        answers = await asyncio.gather(*(http.get("/health") for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5
        assert time.monotonic() - started < READ_TIMEOUT  # nobody waited for the stalled ones
        async with asyncio.timeout(READ_TIMEOUT * 6):
            assert await silent_reader.read() == b""  # closed by the server
            assert await slow_reader.read() == b""
        assert time.monotonic() - started >= READ_TIMEOUT * 0.9
    finally:
        silent_writer.close()
        slow_writer.close()


async def test_connections_over_the_cap_are_turned_away(
    server: HealthServer, http: httpx.AsyncClient
) -> None:
    held = [await raw(server) for _ in range(8)]
    try:
        await asyncio.sleep(0.05)  # the server has taken them all
        reader, writer = await raw(server)
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ")
    finally:
        for _, held_writer in held:
            held_writer.close()
    await asyncio.sleep(0.1)
    assert (await http.get("/health")).status_code == 200


async def test_lifecycle(probe: Probe) -> None:
    health = HealthServer("127.0.0.1", 0, probe)
    await health.stop()  # safe before start
    await health.start()
    port = health.port
    assert port > 0
    await health.start()  # again: nothing changes
    assert health.port == port
    taken = HealthServer("127.0.0.1", port, probe)
    with pytest.raises(HealthServerError, match=f"127.0.0.1:{port}"):
        await taken.start()
    await taken.stop()  # safe after a failed start
    await health.stop()
    await health.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/health")
