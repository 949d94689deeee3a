"""The small HTTP/1.1 server over real loopback HTTP: what the handler sees and sends, HEAD,
keep-alive, 100-continue, and raw-socket clients that send garbage, too much, too slowly or
too many connections; then its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from ingest_service.http11 import (
    HTTP11Server,
    ListenError,
    Request,
    Response,
    json_refusal,
    json_response,
)

MAX_HEADER = 1024
MAX_BODY = 1024
READ_TIMEOUT = 0.3
IDLE_TIMEOUT = 1.0


class Handler:
    """Answers with what it saw, records every request, and misbehaves on demand."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.delay = 0.0
        self.error: Exception | None = None

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        seen = {"method": request.method, "path": request.path, "size": len(request.body)}
        return json_response(200, seen, (("x-seen", "yes"),))


def refuse(status: int, reason: str) -> Response:
    return Response(status, (("content-type", "text/plain"),), f"refused: {reason}".encode())


Make = Callable[..., Awaitable[HTTP11Server]]


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
async def make(handler: Handler) -> AsyncIterator[Make]:
    """``make(**options)``: a started server on a free loopback port, stopped after."""
    made: list[HTTP11Server] = []

    async def factory(**options: Any) -> HTTP11Server:
        settings: dict[str, Any] = {
            "max_connections": 8,
            "read_timeout": READ_TIMEOUT,
            "idle_timeout": IDLE_TIMEOUT,
            "handle_timeout": 0.5,
            "max_header_bytes": MAX_HEADER,
            "max_body_bytes": MAX_BODY,
            "refuse": refuse,
            **options,
        }
        server = HTTP11Server("127.0.0.1", 0, handler, **settings)
        made.append(server)
        await server.start()
        return server

    yield factory
    for server in made:
        await server.stop()


@pytest.fixture
async def server(make: Make) -> HTTP11Server:
    return await make()


@pytest.fixture
async def http(server: HTTP11Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        yield client


async def raw(server: HTTP11Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def exchange(server: HTTP11Server, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything the server answers until it closes."""
    reader, writer = await raw(server)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_the_handler_sees_the_request_whole(
    http: httpx.AsyncClient, handler: Handler
) -> None:
    response = await http.post(
        "/echo?x=1", content=b"a=\xff", headers=[("X-Twice", "1"), ("x-twice", "2")]
    )
    assert response.status_code == 200
    assert response.json() == {"method": "POST", "path": "/echo", "size": 3}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-seen"] == "yes"
    assert int(response.headers["content-length"]) == len(response.content)
    request = handler.requests[0]
    assert (request.target, request.path, request.body) == ("/echo?x=1", "/echo", b"a=\xff")
    assert [value for name, value in request.headers if name == "x-twice"] == ["1", "2"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"b" * 256

    chunked = await http.post("/chunked", content=chunks())
    assert chunked.json()["size"] == 1024
    assert handler.requests[1].body == b"b" * 1024


async def test_head_gets_the_headers_without_the_body(http: httpx.AsyncClient) -> None:
    head = await http.head("/x")
    assert head.status_code == 200 and head.content == b""
    unsent = json_response(200, {"method": "HEAD", "path": "/x", "size": 0}).body
    assert int(head.headers["content-length"]) == len(unsent)
    assert head.headers["x-seen"] == "yes"
    assert (await http.get("/x")).status_code == 200  # the connection is still usable


async def test_keep_alive_pipelining_and_close(server: HTTP11Server, handler: Handler) -> None:
    requests = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n" * 3
    last = b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    answer = await exchange(server, requests + last)  # returns only once the server closes
    assert answer.count(b"HTTP/1.1 200 ") == 4
    assert answer.rsplit(b"HTTP/1.1 200 ", 1)[1].lower().count(b"connection: close") == 1
    assert [request.path for request in handler.requests] == ["/a", "/a", "/a", "/last"]


async def test_expect_100_continue(server: HTTP11Server, handler: Handler) -> None:
    reader, writer = await raw(server)
    try:
        writer.write(
            b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            writer.write(b"hello")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert handler.requests[0].body == b"hello"
    # A body over the cap is refused at once: no 100, the client need not send it.
    too_large = (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\nexpect: 100-continue\r\n\r\n"
    )
    answer = await exchange(server, too_large)
    assert answer.startswith(b"HTTP/1.1 413 ") and b" 100 " not in answer


def chunked(*sizes: int) -> bytes:
    body = b"".join(f"{size:x}\r\n".encode() + b"a" * size + b"\r\n" for size in sizes)
    return b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


REFUSED = [
    ("not HTTP", b"\x16\x03\x01 this is not HTTP\r\n\r\n", 400),
    ("no host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("head over the cap", b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 3000 + b"\r\n\r\n", 431),
    # Whole after two reads, never incomplete over the cap: h11 alone would let it through.
    (
        "head a little over",
        b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 1200 + b"\r\n\r\n",
        431,
    ),
    (
        "declared body over the cap",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1025\r\n\r\n" + b"a" * 1025,
        413,
    ),
    ("chunked body over the cap", chunked(600, 600), 413),
    (
        "two lengths",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        400,
    ),
    (
        "framed both ways",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        400,
    ),
]


@pytest.mark.parametrize(
    ("data", "status"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
async def test_refused_requests_are_answered_and_closed(
    server: HTTP11Server, http: httpx.AsyncClient, handler: Handler, data: bytes, status: int
) -> None:
    answer = await exchange(server, data)  # returns only once the server closes
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"connection: close" in head.lower()
    assert body.startswith(b"refused: ")  # the refuse hook shaped it
    assert handler.requests == []
    assert (await http.get("/after")).status_code == 200


async def test_the_default_refusal_is_a_json_error(make: Make) -> None:
    server = await make(refuse=json_refusal)
    answer = await exchange(server, b"nonsense\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in answer and b'{"error":' in answer


async def test_a_declared_body_over_the_cap_is_not_waited_for(server: HTTP11Server) -> None:
    reader, writer = await raw(server)
    try:
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_a_failing_or_slow_handler_costs_one_answer(
    http: httpx.AsyncClient, handler: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    handler.error = RuntimeError("boom")
    with caplog.at_level(logging.ERROR, logger="ingest_service.http11"):
        failed = await http.get("/fails")
    assert failed.status_code == 500 and failed.content.startswith(b"refused: ")
    assert any(record.exc_info for record in caplog.records)
    handler.error = None
    handler.delay = 2.0
    started = time.monotonic()
    slow = await http.get("/slow")
    assert slow.status_code == 503 and time.monotonic() - started < 1.5
    handler.delay = 0.0
    assert (await http.get("/fine")).status_code == 200  # the same kept-alive connection


async def test_idle_and_read_timeouts(server: HTTP11Server, http: httpx.AsyncClient) -> None:
    idle_reader, idle_writer = await raw(server)  # says nothing
    patient_reader, patient_writer = await raw(server)  # waits, then asks in one go
    slow_reader, slow_writer = await raw(server)
    started = time.monotonic()
    slow_writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")  # and never ends its head
    try:
        answers = await asyncio.gather(*(http.get("/busy") for _ in range(3)))
        assert [answer.status_code for answer in answers] == [200] * 3
        async with asyncio.timeout(5):
            assert await slow_reader.read() == b""  # read_timeout after its first byte
            closed_slow = time.monotonic() - started
            await asyncio.sleep(max(0.0, READ_TIMEOUT * 2 - closed_slow))
            # Idle longer than read_timeout, less than idle_timeout: still served.
            patient_writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await patient_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            assert await idle_reader.read() == b""
            closed_idle = time.monotonic() - started
        assert READ_TIMEOUT * 0.8 <= closed_slow < IDLE_TIMEOUT * 0.8
        assert closed_idle >= IDLE_TIMEOUT * 0.8
    finally:
        for writer in (idle_writer, patient_writer, slow_writer):
            writer.close()


async def test_a_body_that_trickles_is_cut_off(server: HTTP11Server, handler: Handler) -> None:
    reader, writer = await raw(server)
    started = time.monotonic()
    try:
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        async with asyncio.timeout(5):
            while not reader.at_eof():  # a byte every 50 ms: 5 s for the whole body
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.05)
    except ConnectionError:
        pass  # reset while the client was still writing: cut off all the same
    finally:
        writer.close()
    assert READ_TIMEOUT * 0.8 <= time.monotonic() - started < IDLE_TIMEOUT
    assert handler.requests == []


async def test_connections_over_the_cap_are_turned_away(make: Make, handler: Handler) -> None:
    server = await make(max_connections=2)
    held = [await raw(server) for _ in range(2)]
    try:
        await asyncio.sleep(0.05)  # the server has taken them
        # Turned away unasked and closed at once, unread: a request sent first could be lost
        # to the reset, so this client only listens.
        answer = await exchange(server, b"")
        assert answer == (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        assert handler.requests == []
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.1)
    answer = await exchange(server, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_lifecycle(handler: Handler) -> None:
    server = HTTP11Server("127.0.0.1", 0, handler)
    await server.stop()  # safe before start
    port = await server.bind()
    assert port > 0 and server.port == port
    with pytest.raises(httpx.ConnectError):  # bound, not serving yet
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/")
    assert await server.start() == port
    assert await server.start() == port  # again: nothing changes
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200

    taken = HTTP11Server("127.0.0.1", port, handler)
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: ") as error:
        await taken.start()
    assert isinstance(error.value, OSError)
    await taken.stop()  # safe after a failed start
    await server.stop()
    await server.stop()
    assert await taken.start() == port  # a failed start may be retried
    await taken.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/")


async def test_stop_closes_open_connections_quietly(
    make: Make, handler: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make(handle_timeout=None)
    kept_reader, kept_writer = await raw(server)
    kept_writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    waiting_reader, waiting_writer = await raw(server)
    handler.delay = 5.0
    waiting_writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
    try:
        async with asyncio.timeout(5):
            await kept_reader.readuntil(b"\r\n\r\n")
            while len(handler.requests) < 2:  # noqa: ASYNC110 - the handler is the test's
                await asyncio.sleep(0.01)
            with caplog.at_level(logging.DEBUG):
                await server.stop()
            assert await waiting_reader.read() == b""  # no answer: the handler was cancelled
            await kept_reader.read()  # the rest of its answer, then the end: closed
    finally:
        kept_writer.close()
        waiting_writer.close()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "options",
    [
        {"max_connections": 0},
        {"max_header_bytes": 0},
        {"max_body_bytes": -1},
        {"read_timeout": 0},
        {"idle_timeout": -1.0},
        {"handle_timeout": 0},
    ],
)
def test_settings_are_checked_at_once(handler: Handler, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        HTTP11Server("127.0.0.1", 0, handler, **options)
