"""A small HTTP/1.1 server for the few plain HTTP endpoints the project serves itself (the
development OAuth issuer, the agent's ``/health`` and ``/ready``): h11's framing (a strict,
sans-I/O parser: chunked bodies, keep-alive, ``expect: 100-continue``) on asyncio streams, in
the caller's event loop.

A ``handle(request) -> response`` coroutine answers each request read whole; the server does
the rest and bounds everything a client could hold:

- connections: one over ``max_connections`` is answered 503 and closed at once;
- time: a connection waits at most ``idle_timeout`` for a request to begin, which must then
  arrive whole (head and body) within ``read_timeout``; ``handle`` may take ``handle_timeout``,
  past which the answer is 503;
- size: a head over ``max_header_bytes`` is refused with 431, a body over ``max_body_bytes``
  with 413 (unread when its length is declared).

Broken HTTP is refused with h11's status (400 mostly), and so is a request framed both by
length and by chunks (a smuggling attempt). A refused request closes its connection, after
reading (a bounded part of) what the client is still sending so that the answer is not lost
to a reset; otherwise connections are kept alive. ``handle`` raising is logged and answered
500. HEAD is answered without the body. ``start`` may be retried, ``stop`` is safe at any
time.

Errors::

    ListenError   the server cannot listen on its address (an OSError)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import h11

__all__ = [
    "HTTP11Server",
    "Handler",
    "ListenError",
    "Refusal",
    "Request",
    "Response",
    "json_refusal",
    "json_response",
]

log = logging.getLogger(__name__)

_READ_CHUNK = 16 * 1024
# What is read and dropped of a refused request before closing, and for how long.
_DISCARD_BYTES = 1024 * 1024
_DISCARD_SECONDS = 1.0
_OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


class ListenError(OSError):
    """The server cannot listen on its address (in use, not local, not permitted)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A request read whole. Header names are lower case; names and values are decoded as
    Latin-1, so no byte is lost."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class Response:
    """An answer. The server adds ``content-length``, and ``connection: close`` when it closes
    the connection after it."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]
Refusal = Callable[[int, str], Response]


def json_response(status: int, body: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """``body`` as compact strict JSON (no NaN or Infinity), ``application/json``."""
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, (("content-type", "application/json"), *headers), data)


def json_refusal(status: int, reason: str) -> Response:
    """The default answer to a request the server refuses itself: ``{"error": reason}``."""
    return json_response(status, {"error": reason})


class _Refused(Exception):
    """A request the server answers itself, and closes the connection after."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class HTTP11Server:
    """HTTP/1.1 on ``host:port`` (host ``None``: every address; port 0: a free one, which
    ``port`` tells after ``bind``), answered by ``handle``. ``refuse(status, reason)`` shapes
    the answers the server gives itself: 400 or 431 (a broken or oversized head), 413, 500
    (``handle`` raised) and 503 (``handle`` took too long)."""

    def __init__(
        self,
        host: str | None,
        port: int,
        handle: Handler,
        *,
        max_connections: int = 32,
        read_timeout: float = 10.0,
        idle_timeout: float | None = None,
        handle_timeout: float | None = None,
        max_header_bytes: int = 8 * 1024,
        max_body_bytes: int = 64 * 1024,
        refuse: Refusal = json_refusal,
    ) -> None:
        """``idle_timeout`` defaults to ``read_timeout``; ``handle_timeout`` to none."""
        if max_connections < 1 or max_header_bytes < 1 or max_body_bytes < 0:
            raise ValueError(
                "connection and header caps must be positive, the body cap not negative"
            )
        timeouts = (read_timeout, idle_timeout, handle_timeout)
        if any(timeout is not None and timeout <= 0 for timeout in timeouts):
            raise ValueError("timeouts must be positive")
        self.host = host
        self.port = port
        self._handle = handle
        self._refuse = refuse
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._idle_timeout = read_timeout if idle_timeout is None else idle_timeout
        self._handle_timeout = handle_timeout
        self._max_header_bytes = max_header_bytes
        # h11 caps only a head still incomplete after a read: reads no larger than the cap keep
        # the buffer under twice the cap, and _body measures a whole head exactly.
        self._read_chunk = min(_READ_CHUNK, max_header_bytes)
        self._max_body_bytes = max_body_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``host:port`` as a person reads it (``*`` for every address)."""
        host = self.host or "*"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # Lifecycle --------------------------------------------------------------------------------

    async def bind(self) -> int:
        """Take the address without serving yet; returns the port. Safe to call again, also
        after a failed bind."""
        if self._server is None:
            try:
                self._server = await asyncio.start_server(
                    self._connection,
                    self.host,
                    self.port,
                    limit=self._max_header_bytes,
                    start_serving=False,
                )
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {self.address}: {exc.strerror or exc}"
                ) from exc
            # With port 0 and a name of several addresses, each socket has a port: the first's.
            self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def start(self) -> int:
        """Bind unless bound, and serve; returns the port. Safe to call again, also after a
        failed start."""
        await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        return self.port

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
                # Closed at once, not drained: past the cap a connection must cost next to nothing.
                writer.write(_OVER_CAPACITY)
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
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        while True:
            head: h11.Request | None = None
            try:
                async with asyncio.timeout(self._idle_timeout) as deadline:
                    head = await self._next_head(conn, reader, deadline)
                    if head is None:
                        return  # closed by the client
                    body = await self._body(conn, reader, writer, head)
                response = await self._answer(_request(head, body))
            except h11.RemoteProtocolError as exc:
                response = self._refuse(exc.error_status_hint, str(exc)[:200])
            except _Refused as exc:
                response = self._refuse(exc.status, exc.reason)
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            keep_alive = conn.their_state is h11.DONE
            without_body = head is not None and bytes(head.method) == b"HEAD"
            await _send(conn, writer, response, keep_alive=keep_alive, without_body=without_body)
            if not keep_alive:
                await _discard_rest(reader, writer)
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:  # the client asked to close
                return

    async def _next_head(
        self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: asyncio.Timeout
    ) -> h11.Request | None:
        data, closed = conn.trailing_data  # a pipelined request may be here already
        if not data and not closed:
            conn.receive_data(await reader.read(self._read_chunk))
        # The request has begun: from its first byte it has read_timeout to arrive whole.
        deadline.reschedule(asyncio.get_running_loop().time() + self._read_timeout)
        event = await _next_event(conn, reader, self._read_chunk)
        return event if isinstance(event, h11.Request) else None

    async def _body(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: h11.Request,
    ) -> bytes:
        """The body, once the head's size and framing are found acceptable."""
        # Each header line adds ": " and CRLF to its name and value.
        head_size = (
            len(head.method)
            + len(head.target)
            + sum(len(name) + len(value) + 4 for name, value in head.headers)
        )
        if head_size > self._max_header_bytes:
            raise _Refused(431, f"the request head is larger than {self._max_header_bytes} bytes")
        too_large = _Refused(413, f"the request body is larger than {self._max_body_bytes} bytes")
        framing = {bytes(name): bytes(value) for name, value in head.headers}
        if b"content-length" in framing and b"transfer-encoding" in framing:
            # RFC 9112 §6.1: framed both ways, the request may be smuggling another one.
            raise _Refused(400, "send Content-Length or Transfer-Encoding, not both")
        # h11 has checked that a content-length is a number, and the only one.
        if int(framing.get(b"content-length", 0)) > self._max_body_bytes:
            raise too_large
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await _next_event(conn, reader, self._read_chunk)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_body_bytes:
                    raise too_large
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ConnectionError("the client closed the connection mid-request")

    async def _answer(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(self._handle_timeout):
                return await self._handle(request)
        except TimeoutError:
            log.warning(
                "%s %r: no answer within %s s",
                request.method,
                request.path[:200],
                self._handle_timeout,
            )
            return self._refuse(503, "no answer in time; retry later")
        except Exception:  # a failing handler costs one request its answer, not the server
            log.exception("%s %r failed", request.method, request.path[:200])
            return self._refuse(500, "the server failed to answer")


def _request(head: h11.Request, body: bytes) -> Request:
    return Request(
        method=bytes(head.method).decode("latin-1"),
        target=bytes(head.target).decode("latin-1"),
        headers=tuple(
            (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
            for name, value in head.headers
        ),
        body=body,
    )


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, chunk: int) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(chunk))


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    response: Response,
    *,
    keep_alive: bool,
    without_body: bool,
) -> None:
    headers = [*response.headers, ("content-length", str(len(response.body)))]
    if not keep_alive:
        headers.append(("connection", "close"))
    events: list[Any] = [h11.Response(status_code=response.status, headers=headers)]
    if not without_body:
        events.append(h11.Data(data=response.body))
    events.append(h11.EndOfMessage())
    for event in events:
        data = conn.send(event)
        if data:
            writer.write(data)
    await writer.drain()


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
