"""A PI Web API look-alike for tests: real HTTPS on a loopback port (h11 on asyncio streams, a
self-signed certificate), basic authentication, and the response shapes of the published
PI Web API reference for the calls the ``pi_webapi`` collector makes:

    GET  /piwebapi                                {"Links": {...}}
    GET  /piwebapi/points/multiple?path=...       {"Items": [{"Identifier", "Object",
                                                              "Exception"}]}
    GET  /piwebapi/streamsets/value?webId=...     {"Items": [{"WebId", "Name", "Value"}]}
    POST /piwebapi/streamsets/updates?webId=...   {"Items": [{"Source", "Status",
                                                              "LatestMarker"}]}
    GET  /piwebapi/streamsets/updates?marker=...  {"Items": [{"Source", "Status", "Events",
                                                              "RequestedMarker", "LatestMarker"}]}
    GET  /piwebapi/streams/{webId}/recorded?startTime=&endTime=&maxCount=&boundaryType=Inside
                                                  {"Items": [{"Timestamp", "Value", "Good", ...}]}

A "multiple" answer with a failed item is HTTP 207 (Multi-Status). ``maxCount`` above the item
cap (PI's ``MaxReturnedItemsPerCall``, 150,000 by default, small in tests) is refused with 400,
as PI does. ``expire_markers()`` makes every update marker unknown, as a PI Web API restart or
the end of its update retention does. A POST without ``X-Requested-With`` is refused (PI's
CSRF defence). ``fail_next`` answers the next requests with the given statuses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import ssl
from bisect import insort
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from ingest_service.devkeys import ensure_dev_certificate

__all__ = ["PiWebApiServer", "pi_time"]

_MAX_BODY = 1024 * 1024
_ROOT = "/piwebapi"


def pi_time(instant: datetime) -> str:
    """An instant as PI Web API writes it: UTC, ``Z``, 7 fractional digits when not whole."""
    instant = instant.astimezone(UTC)
    text = instant.strftime("%Y-%m-%dT%H:%M:%S")
    if instant.microsecond:
        text += f".{instant.microsecond:06d}0".rstrip("0")
    return text + "Z"


def _parse_time(text: str, now: datetime) -> datetime:
    text = text.strip()
    if text == "*":
        return now
    if text == "*-1d":
        return now - timedelta(days=1)
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(order=True)
class _Event:
    timestamp: datetime
    seq: int
    value: Any = field(compare=False)
    good: bool = field(compare=False, default=True)
    questionable: bool = field(compare=False, default=False)
    substituted: bool = field(compare=False, default=False)


@dataclass
class _Point:
    path: str
    name: str
    web_id: str
    units: str
    events: list[_Event] = field(default_factory=list)


@dataclass
class _Answer:
    status: int
    body: Any
    headers: list[tuple[str, str]] = field(default_factory=list)


class PiWebApiServer:
    """The look-alike; ``await start()``, then ``base_url`` and ``certificate`` (the CA file)."""

    def __init__(
        self,
        directory: Path,
        *,
        username: str = "piuser",
        password: str = "pi-secret",
        max_items: int = 150_000,
    ) -> None:
        self.certificate, self._key = ensure_dev_certificate(directory, ("localhost",))
        self.username = username
        self.password = password
        self.max_items = max_items
        self.requests: Counter[str] = Counter()  # "METHOD route" → count
        self.fail_next: list[int] = []
        self.port = 0
        self._points: dict[str, _Point] = {}  # lower-case path → point
        self._by_web_id: dict[str, _Point] = {}
        self._registrations: dict[str, str] = {}  # registration id → WebId
        self._seq = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}{_ROOT}"

    # The historian --------------------------------------------------------------------------

    def add_point(self, path: str, units: str = "") -> str:
        """Create the PI point ``path`` (``\\\\SERVER\\TAG``); returns its WebId."""
        web_id = "F1DP" + secrets.token_urlsafe(12)
        point = _Point(path, path.rsplit("\\", 1)[-1], web_id, units)
        self._points[path.lower()] = point
        self._by_web_id[web_id] = point
        return web_id

    def record(
        self,
        path: str,
        timestamp: datetime,
        value: Any,
        *,
        good: bool = True,
        questionable: bool = False,
        substituted: bool = False,
    ) -> None:
        """Archive one value of ``path`` (a number, or a digital state such as
        ``{"Name": "Shutdown", "Value": 254, "IsSystem": False}``)."""
        self._seq += 1
        event = _Event(timestamp.astimezone(UTC), self._seq, value, good, questionable, substituted)
        insort(self._points[path.lower()].events, event)

    def expire_markers(self) -> None:
        """Forget every update registration: their markers are refused from now on."""
        self._registrations.clear()

    def count(self, route: str) -> int:
        return self.requests[route]

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certificate, self._key)
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, ssl=context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # HTTP -----------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            conn = h11.Connection(h11.SERVER)
            while True:
                async with asyncio.timeout(30):
                    event = await _next_event(conn, reader)
                    if not isinstance(event, h11.Request):
                        return
                    body = b""
                    while True:
                        part = await _next_event(conn, reader)
                        if isinstance(part, h11.Data):
                            body += bytes(part.data)
                            if len(body) > _MAX_BODY:
                                return
                        elif isinstance(part, h11.EndOfMessage):
                            break
                        else:
                            return
                answer = self._answer(event)
                payload = json.dumps(answer.body).encode()
                headers = [
                    ("content-type", "application/json; charset=utf-8"),
                    ("content-length", str(len(payload))),
                    *answer.headers,
                ]
                for out in (
                    h11.Response(status_code=answer.status, headers=headers),
                    h11.Data(data=payload),
                    h11.EndOfMessage(),
                ):
                    writer.write(conn.send(out) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.ProtocolError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, request: h11.Request) -> _Answer:
        method = request.method.decode()
        parts = urlsplit(request.target.decode())
        path = unquote(parts.path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        if not self._authorized(headers.get("authorization", "")):
            return _Answer(
                401,
                {"Errors": ["Authorization has been denied for this request."]},
                [("www-authenticate", 'Basic realm="PI Web API"')],
            )
        if self.fail_next:
            status = self.fail_next.pop(0)
            return _Answer(status, {"Errors": [f"Injected failure {status}."]})
        if method == "POST" and "x-requested-with" not in headers:
            return _Answer(
                400, {"Errors": ["The X-Requested-With header is required (CSRF defence)."]}
            )
        lowered = path.lower().rstrip("/")
        if not lowered.startswith(_ROOT):
            return _Answer(404, {"Errors": ["Not found."]})
        route = lowered[len(_ROOT) :]
        values = [v for k, v in query if k.lower() == "webid"]
        if route == "" and method == "GET":
            self.requests["GET root"] += 1
            return _Answer(200, {"Links": {"Self": self.base_url}})
        if route == "/points/multiple" and method == "GET":
            self.requests["GET points/multiple"] += 1
            return self._points_multiple([v for k, v in query if k.lower() == "path"])
        if route == "/streamsets/value" and method == "GET":
            self.requests["GET streamsets/value"] += 1
            return self._current(values)
        if route == "/streamsets/updates" and method == "POST":
            self.requests["POST streamsets/updates"] += 1
            return self._register(values)
        if route == "/streamsets/updates" and method == "GET":
            self.requests["GET streamsets/updates"] += 1
            return self._updates([v for k, v in query if k.lower() == "marker"])
        segments = path.rstrip("/").split("/")
        if (
            method == "GET"
            and len(segments) == 5
            and [s.lower() for s in segments[1:3]] == ["piwebapi", "streams"]
            and segments[4].lower() == "recorded"
        ):
            self.requests["GET recorded"] += 1
            return self._recorded(segments[3], {k.lower(): v for k, v in query})
        return _Answer(404, {"Errors": [f"No route for {method} {path}."]})

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        return secrets.compare_digest(user, self.username) and secrets.compare_digest(
            password, self.password
        )

    # The calls ------------------------------------------------------------------------------

    def _value(self, point: _Point, event: _Event) -> dict[str, Any]:
        return {
            "Timestamp": pi_time(event.timestamp),
            "Value": event.value,
            "UnitsAbbreviation": point.units,
            "Good": event.good,
            "Questionable": event.questionable,
            "Substituted": event.substituted,
            "Annotated": False,
        }

    def _points_multiple(self, paths: list[str]) -> _Answer:
        items: list[dict[str, Any]] = []
        failed = False
        for path in paths:
            point = self._points.get(path.lower())
            if point is None:
                failed = True
                items.append(
                    {
                        "Identifier": path,
                        "IdentifierType": "Path",
                        "Exception": {"Errors": [f"PI Point not found '{path}'."]},
                    }
                )
                continue
            items.append(
                {
                    "Identifier": path,
                    "IdentifierType": "Path",
                    "Object": {
                        "WebId": point.web_id,
                        "Id": abs(hash(point.web_id)) % 100_000,
                        "Name": point.name,
                        "Path": point.path,
                        "Descriptor": "",
                        "PointClass": "classic",
                        "PointType": "Float32",
                        "DigitalSetName": "",
                        "EngineeringUnits": point.units,
                        "Span": 100.0,
                        "Zero": 0.0,
                        "Step": False,
                        "Future": False,
                        "DisplayDigits": -5,
                        "Links": {},
                    },
                    "Exception": None,
                }
            )
        return _Answer(207 if failed else 200, {"Items": items, "Links": {}})

    def _unknown_web_ids(self, web_ids: list[str]) -> _Answer | None:
        unknown = [w for w in web_ids if w not in self._by_web_id]
        if not web_ids or unknown:
            return _Answer(400, {"Errors": [f"Unknown or invalid WebID: {unknown[:1]}."]})
        return None

    def _current(self, web_ids: list[str]) -> _Answer:
        refused = self._unknown_web_ids(web_ids)
        if refused:
            return refused
        items = []
        for web_id in web_ids:
            point = self._by_web_id[web_id]
            if point.events:
                value = self._value(point, point.events[-1])
            else:  # a point without data: PI's "Pt Created" system state
                value = {
                    "Timestamp": "1970-01-01T00:00:00Z",
                    "Value": {"Name": "Pt Created", "Value": -11, "IsSystem": True},
                    "UnitsAbbreviation": point.units,
                    "Good": False,
                    "Questionable": False,
                    "Substituted": False,
                    "Annotated": False,
                }
            items.append(
                {"WebId": web_id, "Name": point.name, "Path": point.path, "Value": value}
            )
        return _Answer(200, {"Items": items, "Links": {}})

    def _register(self, web_ids: list[str]) -> _Answer:
        refused = self._unknown_web_ids(web_ids)
        if refused:
            return refused
        items = []
        for web_id in web_ids:
            registration = secrets.token_hex(16)
            self._registrations[registration] = web_id
            point = self._by_web_id[web_id]
            items.append(
                {
                    "Source": web_id,
                    "SourceName": point.name,
                    "SourcePath": point.path,
                    "Status": "Succeeded",
                    "LatestMarker": f"{registration}_{self._seq}",
                }
            )
        return _Answer(200, {"Items": items, "Links": {}})

    def _updates(self, markers: list[str]) -> _Answer:
        items: list[dict[str, Any]] = []
        failed = False
        for marker in markers:
            registration, _, position = marker.rpartition("_")
            web_id = self._registrations.get(registration)
            if web_id is None or not position.isdigit():
                failed = True
                items.append(
                    {
                        "RequestedMarker": marker,
                        "Status": "Failed",
                        "Exception": {
                            "Errors": [f"The marker '{marker}' is invalid or has expired."]
                        },
                    }
                )
                continue
            point = self._by_web_id[web_id]
            since = int(position)
            events = sorted(
                (e for e in point.events if e.seq > since), key=lambda e: e.seq
            )
            items.append(
                {
                    "Source": web_id,
                    "SourceName": point.name,
                    "SourcePath": point.path,
                    "RequestedMarker": marker,
                    "Status": "Succeeded",
                    "Events": [self._value(point, e) for e in events],
                    "LatestMarker": f"{registration}_{self._seq}",
                }
            )
        return _Answer(207 if failed else 200, {"Items": items, "Links": {}})

    def _recorded(self, web_id: str, query: dict[str, str]) -> _Answer:
        point = self._by_web_id.get(web_id)
        if point is None:
            return _Answer(404, {"Errors": ["The specified PI point was not found."]})
        now = datetime.now(UTC)
        try:
            start = _parse_time(query.get("starttime", "*-1d"), now)
            end = _parse_time(query.get("endtime", "*"), now)
            max_count = int(query.get("maxcount", "1000"))
        except ValueError as exc:
            return _Answer(400, {"Errors": [f"Invalid parameter: {exc}."]})
        if max_count > self.max_items:
            return _Answer(
                400,
                {
                    "Errors": [
                        f"Parameter 'maxCount' is greater than the maximum allowed "
                        f"({self.max_items})."
                    ]
                },
            )
        if query.get("boundarytype", "Inside").lower() != "inside":
            return _Answer(400, {"Errors": ["Only boundaryType Inside is served here."]})
        inside = [e for e in point.events if start <= e.timestamp <= end][:max_count]
        return _Answer(
            200,
            {
                "Items": [self._value(point, e) for e in inside],
                "UnitsAbbreviation": point.units,
                "Links": {},
            },
        )


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(64 * 1024))
