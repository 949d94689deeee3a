"""The agent's liveness and readiness endpoints over HTTP/1.1, for Docker and Kubernetes probes:

    GET /health   200 {"status": "healthy", "timestamp": "2025-11-06T14:30:00Z"} while the
                  process serves at all
    GET /ready    200 {"status": "ready", "checks": {...}}, or 503 {"status": "not_ready", ...}
                  when the agent's readiness says so (or cannot say within its time)

HEAD is answered like GET without the body; another method is 405, another path 404. The
server is ``ingest_service.http11`` (h11 on asyncio streams), in the agent's event loop. A
client cannot hold it: an idle connection is closed after ``read_timeout``, a request must
arrive whole within ``read_timeout`` of its first byte, headers are capped, a body (none is
expected) is read up to a few KiB and ignored, and connections are capped.

Errors::

    HealthServerError   the endpoint cannot listen on its address (an OSError)
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingest_service.http11 import HTTP11Server, ListenError, Request, Response, json_response

__all__ = ["HealthServer", "HealthServerError", "Readiness"]

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
READY_PATH = "/ready"
_ALLOWED = "GET, HEAD"
_MAX_HEADER_BYTES = 8 * 1024
_MAX_BODY_BYTES = 8 * 1024


class HealthServerError(OSError):
    """The health endpoint cannot listen on its address."""


@dataclass(frozen=True)
class Readiness:
    """The agent's answer to ``/ready``: whether it is ready, and the checks that decided it
    (JSON values; anything else is shown as text)."""

    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)


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


def _json(status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()) -> Response:
    # Probes must see the state now, never a cached one.
    return json_response(status, _jsonable(body), (("cache-control", "no-store"), *headers))


def _refusal(status: int, reason: str) -> Response:
    return _json(status, {"error": reason})


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
        self._readiness = readiness
        self._readiness_timeout = readiness_timeout
        self._last_readiness_error: str | None = None
        self._http = HTTP11Server(
            host,
            port,
            self._route,
            max_connections=max_connections,
            read_timeout=read_timeout,
            max_header_bytes=_MAX_HEADER_BYTES,
            max_body_bytes=_MAX_BODY_BYTES,
            refuse=_refusal,
        )

    @property
    def port(self) -> int:
        """The port: the one given, or after ``start`` the one listened on."""
        return self._http.port

    async def start(self) -> None:
        """Listen and serve. Safe to call again, also after a failed start."""
        try:
            await self._http.start()
        except ListenError as exc:
            raise HealthServerError(f"the health endpoint {exc}") from exc

    async def stop(self) -> None:
        """Stop listening and close open connections. Safe to call at any time."""
        await self._http.stop()

    # Routes -----------------------------------------------------------------------------------

    async def _route(self, request: Request) -> Response:
        if request.path not in (HEALTH_PATH, READY_PATH):
            return _json(404, {"error": "not found: this server answers /health and /ready"})
        if request.method not in ("GET", "HEAD"):
            return _json(405, {"error": f"use {_ALLOWED}"}, (("allow", _ALLOWED),))
        if request.path == HEALTH_PATH:
            return _json(200, {"status": "healthy", "timestamp": _now_rfc3339()})
        readiness = await self._ask_readiness()
        return _json(
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
