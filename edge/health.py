"""The agent's liveness and readiness endpoints over HTTP/1.1, for Docker and Kubernetes probes:

    GET /health   200 {"status": "healthy", "timestamp": "2025-11-06T14:30:00Z"} while the
                  process serves at all
    GET /ready    200 {"status": "ready", "checks": {...}}, or 503 {"status": "not_ready", ...}
                  when the agent's readiness says so (or cannot say within its time)

HEAD is answered like GET without the body; another method is 405, another path 404. Framing
is h11's on asyncio streams, in the agent's event loop. A client cannot hold the server: each
request must arrive whole within ``read_timeout``, headers are capped, a body (none is
expected) is read up to a few KiB and ignored, and connections are capped.

Errors::

    HealthServerError   the endpoint cannot listen on its address (an OSError)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import h11

__all__ = ["HealthServer", "HealthServerError", "Readiness"]

log = logging.getLogger(__name__)

HEALTH_PATH = b"/health"
READY_PATH = b"/ready"
_ALLOWED = "GET, HEAD"
_MAX_HEADER_BYTES = 8 * 1024
_MAX_BODY_BYTES = 8 * 1024
_READ_CHUNK = 4 * 1024
# What is read and dropped of a refused request before closing, and for how long.
_DISCARD_BYTES = 256 * 1024
_DISCARD_SECONDS = 1.0


class HealthServerError(OSError):
    """The health endpoint cannot listen on its address."""


@dataclass(frozen=True)
class Readiness:
    """The agent's answer to ``/ready``: whether it is ready, and the checks that decided it
    (JSON values; anything else is shown as text)."""

    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


class _BodyTooLarge(Exception):
    pass


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON can hold it: non-finite floats become null, keys and unknown
    types text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return str(value)


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class HealthServer:
    """``/health`` and ``/ready`` on ``host:port`` (0: a free port; ``port`` tells which after
    ``start``). ``readiness`` is awaited for each ``/ready`` request."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Callable[[], Awaitable[Readiness]],
        *,
        read_timeout: float = 10.0,
        readiness_timeout: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        self.host = host
        self.port = port
        self._readiness = readiness
        self._read_timeout = read_timeout
        self._readiness_timeout = readiness_timeout
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._last_readiness_error: str | None = None

    async def start(self) -> None:
        """Listen and serve. Safe to call again, also after a failed start."""
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._connection, self.host, self.port, limit=_MAX_HEADER_BYTES
            )
        except OSError as exc:
            raise HealthServerError(
                f"the health endpoint cannot listen on {self.host}:{self.port}:"
                f" {exc.strerror or exc}"
            ) from exc
        # With port 0 and a name of several addresses, each socket has a port: the first's.
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close open connections. Safe to call at any time."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # Connections ------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > self._max_connections:
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                    b"connection: close\r\n\r\n"
                )
                await writer.drain()
                return
            await self._exchange_all(reader, writer)
        except (ConnectionError, TimeoutError, h11.ProtocolError):
            pass  # the client went away, stalled, or cannot be answered
        except asyncio.CancelledError:
            # stop() cancels open connections. Ending normally: Python 3.11's stream server
            # logs every connection task that ends cancelled as an error.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _exchange_all(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        while True:
            request: h11.Request | None = None
            try:
                async with asyncio.timeout(self._read_timeout):
                    event = await _next_event(conn, reader)
                    if not isinstance(event, h11.Request):
                        return  # closed by the client
                    request = event
                    await _skip_body(conn, reader)
                response = await self._route(request)
            except h11.RemoteProtocolError as exc:
                response = _Response(exc.error_status_hint, {"error": str(exc)[:200]})
            except _BodyTooLarge:
                response = _Response(
                    413, {"error": f"a request body is at most {_MAX_BODY_BYTES} bytes"}
                )
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            keep_alive = conn.their_state is h11.DONE
            head = request is not None and bytes(request.method) == b"HEAD"
            await _send(conn, writer, response, keep_alive=keep_alive, head=head)
            if not keep_alive:
                await _discard_rest(reader, writer)
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:  # the client asked to close
                return

    # Routes -----------------------------------------------------------------------------------

    async def _route(self, request: h11.Request) -> _Response:
        path = bytes(request.target).split(b"?", 1)[0]
        if path not in (HEALTH_PATH, READY_PATH):
            return _Response(404, {"error": "not found: this server answers /health and /ready"})
        if bytes(request.method) not in (b"GET", b"HEAD"):
            return _Response(405, {"error": f"use {_ALLOWED}"}, (("allow", _ALLOWED),))
        if path == HEALTH_PATH:
            return _Response(200, {"status": "healthy", "timestamp": _now_rfc3339()})
        readiness = await self._ask_readiness()
        return _Response(
            200 if readiness.ready else 503,
            {"status": "ready" if readiness.ready else "not_ready", "checks": readiness.checks},
        )

    async def _ask_readiness(self) -> Readiness:
        try:
            async with asyncio.timeout(self._readiness_timeout):
                answer = await self._readiness()
            if not isinstance(answer, Readiness):
                raise TypeError(f"readiness returned {type(answer).__name__}, not Readiness")
        except Exception as exc:  # a failing check means not ready, never a crash
            what = (
                f"no answer within {self._readiness_timeout:g} s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            if what != self._last_readiness_error:
                log.warning("the readiness check failed: %s", what)
                self._last_readiness_error = what
            return Readiness(ready=False, checks={"error": f"the readiness check failed: {what}"})
        self._last_readiness_error = None
        return answer


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_READ_CHUNK))


async def _skip_body(conn: h11.Connection, reader: asyncio.StreamReader) -> None:
    """Read the request's body (none is expected) up to the cap, and ignore it."""
    size = 0
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > _MAX_BODY_BYTES:
                raise _BodyTooLarge
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ConnectionError("the client closed the connection mid-request")


async def _discard_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read (a bounded part of) what the client is still sending before closing: closing with
    unread data makes the kernel reset the connection, and the client could lose the answer."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_DISCARD_SECONDS):
            if writer.can_write_eof():
                writer.write_eof()
            discarded = 0
            while discarded < _DISCARD_BYTES:
                data = await reader.read(64 * 1024)
                if not data:
                    return
                discarded += len(data)


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    response: _Response,
    *,
    keep_alive: bool,
    head: bool,
) -> None:
    body = json.dumps(_jsonable(response.body), separators=(",", ":"), allow_nan=False).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        *response.headers,
    ]
    if not keep_alive:
        headers.append(("connection", "close"))
    events: list[Any] = [h11.Response(status_code=response.status, headers=headers)]
    if not head:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    for event in events:
        data = conn.send(event)
        if data:
            writer.write(data)
    await writer.drain()
