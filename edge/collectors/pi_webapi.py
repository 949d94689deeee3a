"""The ``pi_webapi`` collector: OSIsoft PI (AVEVA PI Server) through PI Web API over HTTPS.

PI's native protocol (port 5450) has no Python client; PI Web API is PI's REST front and is what
this collector speaks, with httpx and HTTP basic authentication.

How it reads, per run:

1. **Lookup**: every configured tag's path (``\\\\SERVER\\TAG``) is resolved to its WebId with
   ``GET points/multiple?path=...``, once. A path PI does not know is logged once with PI's
   reason and left out; the other tags go on. When no tag at all is found the run fails.
2. **Registration**: ``POST streamsets/updates?webId=...`` registers each stream for updates and
   returns its first marker. Registering comes before any read, so nothing falls between the
   catch-up read and the first update.
3. **Catch-up**: a tag with a watermark (the PI timestamp of the last value emitted, kept in the
   buffer) is read with ``GET streams/{webId}/recorded`` from the watermark to now, a page of at
   most ``max_recorded_per_request`` values at a time, each next page starting at the last
   timestamp of the one before (PI's item cap, ``MaxReturnedItemsPerCall``, refuses larger
   pages). A tag without a watermark starts at its current value (``GET streamsets/value``).
4. **Updates**: every ``poll_interval``, ``GET streamsets/updates?marker=...`` returns what PI
   received since each marker, and the next marker. A marker PI no longer knows (expired, or
   PI Web API restarted) puts its tag back to step 2 and 3: registered again, then read from
   its watermark with recorded reads, so an expired marker never leaves a gap.

Readings carry PI's timestamps, never the agent's clock, so a value read twice (an update and
a recorded read overlapping) is stored once by the gateway. Quality: ``Good`` and neither
``Questionable`` nor ``Substituted`` is GOOD, ``Questionable`` or ``Substituted`` is UNCERTAIN,
not ``Good`` is BAD. A value that is not a number (a digital state such as
``{"Name": "Shutdown", "Value": 254}``, a string) becomes a BAD reading without a value, which
the transform counts and skips; its timestamp still moves the watermark.

Errors (all ``CollectorError``; the agent restarts a failed collector with backoff, and the
restart continues from the watermarks):

    retryable=False   the credentials are refused (HTTP 401/403), the server's certificate is
                      not trusted, PI refuses a request as invalid (another 4xx, e.g. a page
                      larger than its item cap), no configured tag exists, the CA file cannot
                      be read
    retryable=True    the server cannot be reached, does not answer within ``timeout``,
                      answers 5xx or 429, or answers with something that is not PI's JSON or
                      is larger than ``MAX_RESPONSE_BYTES``
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.collectors.base import Collector, CollectorError, ReadingSink, SourceConfig
from edge.readings import Quality, Reading
from ingest_service.config import Duration

__all__ = ["MAX_RESPONSE_BYTES", "PiTag", "PiWebApiCollector", "PiWebApiConfig", "quality_of"]

log = logging.getLogger(__name__)

# An answer larger than this is refused (retryable): a page of 150,000 values is about 25 MB.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Streams (WebIds, markers) per request, and paths per lookup: keeps URLs far below the
# 16 KiB that HTTP.sys, PI Web API's listener, accepts.
STREAMS_PER_REQUEST = 100
PATHS_PER_REQUEST = 50
# Readings gathered before an emit; each emit waits for the buffer to seal its batch.
EMIT_READINGS = 5_000
# PI's own item cap (MaxReturnedItemsPerCall) out of the box.
PI_DEFAULT_ITEM_CAP = 150_000
_MAX_QUOTED = 300
_MICROSECOND = timedelta(microseconds=1)
_LOOKUP_FIELDS = (
    "Items.Identifier;Items.Object.WebId;Items.Object.Name;"
    "Items.Object.EngineeringUnits;Items.Exception"
)

_T = TypeVar("_T")


class PiTag(BaseModel):
    """One PI point and what it measures. Give ``tag_name`` (looked up on the source's
    ``data_server``) or the full ``path``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tag_name: str | None = Field(default=None, min_length=1)
    path: str | None = Field(default=None, min_length=3)
    parameter: str = Field(min_length=1)
    well_id: str = Field(min_length=1)
    # None: PI's engineering units of the point.
    unit: str | None = Field(default=None, min_length=1)

    @field_validator("path")
    @classmethod
    def _point_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("\\\\") or "\\" not in value[2:]):
            raise ValueError("must be a PI point path such as \\\\SERVER\\TAG")
        return value

    @field_validator("tag_name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and "\\" in value:
            raise ValueError("is a tag name without backslashes; write a full path as 'path'")
        return value

    @model_validator(mode="after")
    def _one_name(self) -> PiTag:
        if (self.tag_name is None) == (self.path is None):
            raise ValueError("give either tag_name or path, not both and not neither")
        return self


class PiWebApiConfig(SourceConfig):
    """PI points read through PI Web API; see the module docstring for how."""

    type: Literal["pi_webapi"] = "pi_webapi"
    base_url: str
    data_server: str | None = Field(default=None, min_length=1)
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    ca_file: Path | None = None
    verify: bool = True
    timeout: Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))
    poll_interval: Duration = Field(default=timedelta(seconds=5), gt=timedelta(0))
    max_recorded_per_request: int = Field(default=10_000, ge=1, le=PI_DEFAULT_ITEM_CAP)
    tags: tuple[PiTag, ...] = Field(min_length=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        # The value is not echoed: a URL may carry credentials.
        try:
            parts = urlsplit(value)
            host = parts.hostname
        except ValueError:
            parts, host = None, None
        if parts is None or parts.scheme not in ("http", "https") or not host:
            raise ValueError("must be an https:// URL, e.g. https://pi.example.com/piwebapi")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials: use username and password")
        if parts.query or parts.fragment or any(c.isspace() for c in value):
            raise ValueError("must be the PI Web API root, without query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> PiWebApiConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: give both or neither")
        if self.ca_file is not None and not self.verify:
            raise ValueError("ca_file applies only with verify: true")
        if self.data_server is not None and "\\" in self.data_server:
            raise ValueError("data_server is the PI Data Archive's name, without backslashes")
        named = [i for i, tag in enumerate(self.tags) if tag.tag_name is not None]
        if named and self.data_server is None:
            raise ValueError(
                f"tags[{named[0]}] has a tag_name: set data_server (the PI Data Archive it is "
                "on) or give the tag's full path"
            )
        seen: dict[str, int] = {}
        for index, tag in enumerate(self.tags):
            key = self.tag_path(tag).lower()  # PI paths are not case-sensitive
            if key in seen:
                raise ValueError(
                    f"tags[{index}] and tags[{seen[key]}] are both {self.tag_path(tag)}; "
                    "each PI point may be listed once"
                )
            seen[key] = index
        return self

    def tag_path(self, tag: PiTag) -> str:
        """The PI point path of ``tag``: its ``path``, or ``\\\\data_server\\tag_name``."""
        if tag.path is not None:
            return tag.path
        return f"\\\\{self.data_server}\\{tag.tag_name}"

    def build(self) -> Collector:
        return PiWebApiCollector(self)


def quality_of(value: Mapping[str, Any]) -> Quality:
    """PI's ``Good``/``Questionable``/``Substituted`` flags as a quality code (a flag that is
    absent counts as PI's default: good, not questionable, not substituted)."""
    if value.get("Good", True) is False:
        return Quality.BAD
    if value.get("Questionable") is True or value.get("Substituted") is True:
        return Quality.UNCERTAIN
    return Quality.GOOD


def _number(raw: Any) -> float | None:
    """A PI value as a float; None for digital states, strings, booleans and the like."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    number = float(raw)
    return number if math.isfinite(number) else None


def _parse_time(raw: Any) -> datetime:
    """A PI timestamp (ISO 8601, ``Z``, up to 7 fractional digits) as an aware UTC datetime."""
    if not isinstance(raw, str):
        raise ValueError(f"timestamp {raw!r} is not text")
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:  # Python takes at most 6 fractional digits: PI sends 7 (100 ns ticks)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        rest = rest[: min(digits, 6)] + rest[digits:]
        text = f"{head}.{rest}"
    instant = datetime.fromisoformat(text)
    if instant.tzinfo is None:
        raise ValueError(f"timestamp {raw!r} has no time zone")
    return instant.astimezone(UTC)


def _time_text(instant: datetime) -> str:
    """An instant as PI Web API takes it in a URL: ISO 8601 UTC with ``Z``."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _errors_of(body: Any) -> str:
    """PI's reason from an error body (``{"Errors": [...]}`` or ``{"Message": ...}``), short."""
    if isinstance(body, dict):
        errors = body.get("Errors")
        if isinstance(errors, list) and errors:
            return " ".join(str(e) for e in errors)[:_MAX_QUOTED]
        for key in ("Message", "message", "error_description"):
            if isinstance(body.get(key), str):
                return str(body[key])[:_MAX_QUOTED]
    return ""


def _items(body: Any, what: str) -> list[dict[str, Any]]:
    """The ``Items`` of a PI collection answer; a malformed answer is a retryable error."""
    items = body.get("Items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise CollectorError(f"{what}: the answer has no list of Items", retryable=True)
    return items


def _certificate_problem(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass(slots=True)
class _Stream:
    """One configured tag found in PI, and where reading it stands."""

    tag: PiTag
    path: str
    web_id: str
    unit: str  # the configured unit, else the point's engineering units, else ""
    watermark: datetime | None = None
    marker: str | None = None
    updates_refused: bool = False  # PI would not register it: read by recorded polls
    warned: bool = False


@dataclass(slots=True)
class _Emitter:
    """Readings gathered across tags, emitted with the watermarks of the tags they belong to,
    in one transaction, so a watermark never runs ahead of its data."""

    sink: ReadingSink
    readings: list[Reading] = field(default_factory=list)
    watermarks: dict[str, str] = field(default_factory=dict)
    emitted: int = 0

    async def add(self, stream: _Stream, value: Mapping[str, Any], what: str) -> None:
        if "Errors" in value:
            # PI Web API's mark of an error met while it was streaming the answer.
            raise CollectorError(
                f"{what}: PI reported an error within the answer: {_errors_of(value)}",
                retryable=True,
            )
        try:
            instant = _parse_time(value.get("Timestamp"))
        except ValueError as exc:
            raise CollectorError(f"{what}: {exc}", retryable=True) from exc
        number = _number(value.get("Value"))
        quality = quality_of(value) if number is not None else Quality.BAD
        unit = stream.unit or str(value.get("UnitsAbbreviation") or "")
        tag = stream.tag
        self.readings.append(
            Reading(tag.well_id, tag.parameter, instant, number, unit, quality, stream.path)
        )
        if stream.watermark is None or instant > stream.watermark:
            stream.watermark = instant
            self.watermarks[stream.path] = instant.isoformat()
        if len(self.readings) >= EMIT_READINGS:
            await self.flush()

    async def flush(self) -> None:
        if self.readings or self.watermarks:
            readings, watermarks = self.readings, self.watermarks
            self.readings, self.watermarks = [], {}
            await self.sink.emit(readings, watermarks)
            self.emitted += len(readings)


class _PiHttp:
    """PI Web API over httpx: one bounded exchange per call, errors mapped to
    ``CollectorError``."""

    def __init__(self, config: PiWebApiConfig) -> None:
        self._config = config
        self._timeout = config.timeout.total_seconds()
        verify: ssl.SSLContext | bool = config.verify
        if config.ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(config.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise CollectorError(
                    f"cannot read the CA file {config.ca_file}: {exc}", retryable=False
                ) from exc
        auth = None
        if config.username is not None and config.password is not None:
            auth = httpx.BasicAuth(config.username, config.password.get_secret_value())
        self._client = httpx.AsyncClient(
            base_url=config.base_url + "/",
            auth=auth,
            verify=verify,
            timeout=httpx.Timeout(self._timeout),
            follow_redirects=False,  # a redirect must not carry the credentials elsewhere
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            # X-Requested-With: PI Web API's CSRF defence refuses a POST without it.
            headers={"accept": "application/json", "x-requested-with": "XMLHttpRequest"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _who(self) -> str:
        user = self._config.username
        return f"user {user!r}" if user else "anonymous access"

    async def call(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        accept: tuple[int, ...] = (200, 207),
    ) -> tuple[int, Any]:
        """``method path`` with ``params``; returns (status, parsed JSON) for a status in
        ``accept``, raises ``CollectorError`` for any other outcome."""
        what = f"{method} {self._config.base_url}/{path}"
        try:
            # The whole exchange is bounded, not only each read.
            async with asyncio.timeout(self._timeout):
                async with self._client.stream(method, path, params=list(params)) as response:
                    body = await self._read_capped(response, what)
        except TimeoutError as exc:
            raise CollectorError(
                f"{what}: no answer within {self._timeout:g} s", retryable=True
            ) from exc
        except httpx.HTTPError as exc:
            problem = _certificate_problem(exc)
            if problem is not None:
                raise CollectorError(
                    f"{what}: the server's certificate is not trusted "
                    f"({problem.verify_message or problem}); set ca_file to the CA that "
                    "issued it",
                    retryable=False,
                ) from exc
            raise CollectorError(
                f"{what}: {type(exc).__name__}: {exc or 'connection failed'}", retryable=True
            ) from exc
        status = response.status_code
        try:
            parsed: Any = json.loads(body) if body else None
        except (ValueError, RecursionError):
            parsed = None
        if status in accept:
            if parsed is None:
                raise CollectorError(f"{what}: HTTP {status} without JSON", retryable=True)
            return status, parsed
        reason = _errors_of(parsed)
        said = f"{what}: HTTP {status}" + (f": {reason}" if reason else "")
        if status in (401, 403):
            raise CollectorError(
                f"{said} — PI Web API refused {self._who()}; check username and password "
                "and the user's PI Web API access",
                retryable=False,
            )
        if status == 429 or status >= 500:
            raise CollectorError(said, retryable=True)
        if 300 <= status < 400:
            location = response.headers.get("location", "")[:_MAX_QUOTED]
            raise CollectorError(
                f"{said} redirect to {location}; set base_url to where it points",
                retryable=False,
            )
        raise CollectorError(said, retryable=False)

    async def _read_capped(self, response: httpx.Response, what: str) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise self._oversized(response, what)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise self._oversized(response, what)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _oversized(response: httpx.Response, what: str) -> CollectorError:
        return CollectorError(
            f"{what}: HTTP {response.status_code} with a body over {MAX_RESPONSE_BYTES} bytes",
            retryable=True,
        )


class PiWebApiCollector:
    """The running ``pi_webapi`` source: implements ``Collector``; see the module docstring."""

    def __init__(self, config: PiWebApiConfig) -> None:
        self.config = config
        self._name = config.name

    async def probe(self) -> str:
        """Connect, authenticate and look every tag up; fail when any tag is missing."""
        config = self.config
        http = _PiHttp(config)
        try:
            await http.call("GET", "", accept=(200,))
            streams, missing = await self._lookup(http)
        finally:
            await http.aclose()
        if missing:
            shown = "; ".join(f"{path}: {reason}" for path, reason in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CollectorError(
                f"{config.base_url}: {len(missing)} of {len(config.tags)} tags not found: "
                f"{shown}{more}",
                retryable=False,
            )
        user = f" as {config.username}" if config.username else ""
        return f"PI Web API at {config.base_url}{user}: all {len(streams)} tags found"

    async def run(self, sink: ReadingSink) -> None:
        """Look up, register, catch up from the watermarks, then follow the updates."""
        http = _PiHttp(self.config)
        try:
            streams, missing = await self._lookup(http)
            for path, reason in missing:
                log.error("pi_webapi %s: tag %s is not read: %s", self._name, path, reason)
            if not streams:
                raise CollectorError(
                    f"none of the {len(self.config.tags)} tags exists in PI "
                    f"({self.config.base_url})",
                    retryable=False,
                )
            for stream in streams:
                stream.watermark = await self._stored_watermark(sink, stream)
            log.info(
                "pi_webapi %s: reading %d tags from %s (%d resume from a watermark)",
                self._name,
                len(streams),
                self.config.base_url,
                sum(1 for s in streams if s.watermark is not None),
            )
            emitter = _Emitter(sink)
            interval = self.config.poll_interval.total_seconds()
            while True:
                await self._resume(http, emitter, [s for s in streams if s.marker is None])
                await emitter.flush()
                await asyncio.sleep(interval)
                await self._follow_updates(http, emitter, streams)
                await emitter.flush()
        finally:
            await http.aclose()

    async def _stored_watermark(self, sink: ReadingSink, stream: _Stream) -> datetime | None:
        stored = await sink.watermark(stream.path)
        if stored is None:
            return None
        try:
            instant = datetime.fromisoformat(stored)
        except ValueError:
            instant = None
        if instant is None or instant.tzinfo is None:
            log.warning(
                "pi_webapi %s: watermark %r of %s is not a timestamp; starting at the current "
                "value instead",
                self._name,
                stored,
                stream.path,
            )
            return None
        return instant.astimezone(UTC)

    # Lookup ---------------------------------------------------------------------------------

    async def _lookup(self, http: _PiHttp) -> tuple[list[_Stream], list[tuple[str, str]]]:
        """The tags PI knows, as streams, and (path, reason) for each tag it does not."""
        config = self.config
        streams: list[_Stream] = []
        missing: list[tuple[str, str]] = []
        for chunk in _chunks(config.tags, PATHS_PER_REQUEST):
            paths = [config.tag_path(tag) for tag in chunk]
            params = [("path", path) for path in paths] + [("selectedFields", _LOOKUP_FIELDS)]
            _, body = await http.call("GET", "points/multiple", params)
            items = _items(body, "GET points/multiple")
            by_identifier = {
                str(item.get("Identifier", "")).lower(): item for item in items
            }
            for index, (tag, path) in enumerate(zip(chunk, paths, strict=True)):
                item = by_identifier.get(path.lower())
                if item is None and index < len(items) and "Identifier" not in items[index]:
                    item = items[index]  # an answer without identifiers is in request order
                found = item.get("Object") if item is not None else None
                web_id = found.get("WebId") if isinstance(found, dict) else None
                if not isinstance(found, dict) or not isinstance(web_id, str) or not web_id:
                    reason = _errors_of(item.get("Exception")) if item is not None else ""
                    missing.append((path, reason or "PI did not return the point"))
                    continue
                units = found.get("EngineeringUnits")
                unit = tag.unit or (units.strip() if isinstance(units, str) else "")
                streams.append(_Stream(tag=tag, path=path, web_id=web_id, unit=unit))
        return streams, missing

    # Registration and catch-up --------------------------------------------------------------

    async def _resume(self, http: _PiHttp, emitter: _Emitter, streams: list[_Stream]) -> None:
        """Streams without a marker: register them for updates, then read what they missed
        (recorded values from the watermark, or the current value when there is none)."""
        if not streams:
            return
        await self._register(http, [s for s in streams if not s.updates_refused])
        current = [s for s in streams if s.watermark is None]
        behind = [s for s in streams if s.watermark is not None]
        if current:
            await self._read_current(http, emitter, current)
        backfilled = 0
        for stream in behind:
            backfilled += await self._read_recorded(http, emitter, stream)
        if backfilled:
            # Tags PI would not register are polled this way every time: not worth a line each.
            level = logging.INFO if any(not s.updates_refused for s in behind) else logging.DEBUG
            log.log(
                level,
                "pi_webapi %s: read %d recorded values of %d tags from their watermarks",
                self._name,
                backfilled,
                len(behind),
            )

    async def _register(self, http: _PiHttp, streams: list[_Stream]) -> None:
        for chunk in _chunks(streams, STREAMS_PER_REQUEST):
            what = "POST streamsets/updates"
            params = [("webId", s.web_id) for s in chunk]
            _, body = await http.call("POST", "streamsets/updates", params)
            items = _items(body, what)
            by_source = {item.get("Source"): item for item in items if item.get("Source")}
            for index, stream in enumerate(chunk):
                item = by_source.get(stream.web_id)
                if item is None and index < len(items) and not items[index].get("Source"):
                    item = items[index]
                marker = item.get("LatestMarker") if item is not None else None
                failed = item is None or item.get("Exception") or item.get("Status") not in (
                    None,
                    "Succeeded",
                )
                if failed or not isinstance(marker, str) or not marker:
                    stream.updates_refused = True
                    reason = _errors_of(item.get("Exception")) if item is not None else ""
                    log.warning(
                        "pi_webapi %s: PI did not register %s for updates (%s); it is read by "
                        "recorded reads every poll instead",
                        self._name,
                        stream.path,
                        reason or "no marker in the answer",
                    )
                    continue
                stream.marker = marker

    async def _read_current(
        self, http: _PiHttp, emitter: _Emitter, streams: list[_Stream]
    ) -> None:
        for chunk in _chunks(streams, STREAMS_PER_REQUEST):
            what = "GET streamsets/value"
            _, body = await http.call(
                "GET", "streamsets/value", [("webId", s.web_id) for s in chunk]
            )
            by_web_id = {item.get("WebId"): item for item in _items(body, what)}
            for stream in chunk:
                item = by_web_id.get(stream.web_id)
                value = item.get("Value") if item is not None else None
                if not isinstance(value, dict):
                    if not stream.warned:
                        stream.warned = True
                        reason = _errors_of(item.get("Exception")) if item is not None else ""
                        log.warning(
                            "pi_webapi %s: no current value of %s: %s",
                            self._name,
                            stream.path,
                            reason or "not in the answer",
                        )
                    continue
                await emitter.add(stream, value, what)

    async def _read_recorded(self, http: _PiHttp, emitter: _Emitter, stream: _Stream) -> int:
        """Recorded values after the watermark up to now, page by page; how many were new."""
        assert stream.watermark is not None
        page = self.config.max_recorded_per_request
        path = f"streams/{quote(stream.web_id, safe='')}/recorded"
        what = f"GET streams/{{webId}}/recorded of {stream.path}"
        start = stream.watermark
        read = 0
        while True:
            params = [
                ("startTime", _time_text(start)),
                ("endTime", "*"),
                ("boundaryType", "Inside"),
                ("maxCount", str(page)),
            ]
            try:
                _, body = await http.call("GET", path, params)
            except CollectorError as exc:
                if not exc.retryable and "maximum" in str(exc).lower():
                    raise CollectorError(
                        f"{exc}; lower max_recorded_per_request to PI Web API's "
                        "MaxReturnedItemsPerCall or below",
                        retryable=False,
                    ) from exc
                raise
            items = _items(body, what)
            last = start
            for value in items:
                try:
                    instant = _parse_time(value.get("Timestamp"))
                except ValueError as exc:
                    raise CollectorError(f"{what}: {exc}", retryable=True) from exc
                # Inside: a page starts with the values at its start time, already read.
                if instant > start:
                    await emitter.add(stream, value, what)
                    read += 1
                last = max(last, instant)
            if len(items) < page:
                return read
            # A full page: there may be more. Next page from its last time; a page full of
            # one single instant moves on by a microsecond (PI's resolution is 15 µs).
            start = last if last > start else start + _MICROSECOND

    # Updates --------------------------------------------------------------------------------

    async def _follow_updates(
        self, http: _PiHttp, emitter: _Emitter, streams: list[_Stream]
    ) -> None:
        """What PI received since each marker; a marker PI refuses leaves its stream without
        one, to be registered again and read from its watermark."""
        lost = 0
        following = [s for s in streams if s.marker is not None]
        for chunk in _chunks(following, STREAMS_PER_REQUEST):
            what = "GET streamsets/updates"
            params = [("marker", s.marker or "") for s in chunk]
            # 404 (cache not found) and 409 (invalid marker): every marker of the call is lost.
            status, body = await http.call(
                "GET", "streamsets/updates", params, accept=(200, 207, 404, 409)
            )
            if status in (404, 409):
                for stream in chunk:
                    stream.marker = None
                lost += len(chunk)
                continue
            items = _items(body, what)
            by_marker = {item.get("RequestedMarker"): item for item in items}
            for index, stream in enumerate(chunk):
                item = by_marker.get(stream.marker)
                if item is None and index < len(items) and "RequestedMarker" not in items[index]:
                    item = items[index]
                failed = item is None or item.get("Exception") or item.get("Status") not in (
                    None,
                    "Succeeded",
                )
                latest = item.get("LatestMarker") if item is not None else None
                if failed or not isinstance(latest, str) or not latest:
                    stream.marker = None
                    lost += 1
                    continue
                assert item is not None
                events = item.get("Events") or []
                if not isinstance(events, list):
                    raise CollectorError(f"{what}: Events is not a list", retryable=True)
                for event in events:
                    if not isinstance(event, dict):
                        raise CollectorError(f"{what}: an event is not an object", retryable=True)
                    if str(event.get("Action", "")).lower() in ("remove", "delete"):
                        continue  # a value deleted in PI: the point already sent stays
                    await emitter.add(stream, event, what)
                stream.marker = latest
        if lost:
            log.warning(
                "pi_webapi %s: PI no longer knows the update markers of %d tags (expired, or "
                "PI Web API restarted); registering them again and reading them from their "
                "watermarks",
                self._name,
                lost,
            )
