"""A TCP proxy on loopback that a test can cut, freeze and restore: a real network outage
between the gateway and a server (refused, or silently hanging), without touching the server."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to a TCP address or a unix socket until ``cut()``."""

    def __init__(self, target_host: str, target_port: int | None) -> None:
        self._host = target_host
        self._port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0

    @classmethod
    def for_postgres(cls, url: str) -> tuple[CuttableProxy, str]:
        """A proxy to the server of ``url`` and the URL to reach it through the proxy."""
        parts = urlsplit(url)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        if socket_dir and socket_dir.startswith("/"):
            port = parts.port or 5432
            proxy = cls(f"{socket_dir}/.s.PGSQL.{port}", None)
        else:
            proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5432)
        user = f"{parts.username}@" if parts.username else ""
        return proxy, urlunsplit((parts.scheme, f"{user}127.0.0.1:{{port}}", parts.path, "", ""))

    @classmethod
    def for_redis(cls, url: str) -> tuple[CuttableProxy, str]:
        """A proxy to the Redis server of ``url`` and the URL to reach it through the proxy."""
        parts = urlsplit(url)
        if parts.scheme == "unix":
            proxy = cls(parts.path, None)
        else:
            proxy = cls(parts.hostname or "127.0.0.1", parts.port or 6379)
        return proxy, "redis://127.0.0.1:{port}/0"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones, like a pulled cable."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def freeze(self) -> None:
        """Keep every connection open but pass no more bytes, like a hung server or a black-holed
        route: the hardest outage, since nothing ever fails by itself."""
        self._flowing.clear()

    async def restore(self) -> None:
        """Undo ``cut`` or ``freeze``."""
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._port is None:
            return await asyncio.open_unix_connection(self._host)
        return await asyncio.open_connection(self._host, self._port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await self._open_target()
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)
