"""The ``pi_webapi`` collector against a PI Web API look-alike over real HTTPS on loopback
(tests/pi_webapi_server.py): tag lookup, current values, update markers, marker expiry with
the recorded-read fallback, backfill after a restart paged under the item cap, quality, digital
states, an unknown tag, refused credentials, an untrusted certificate, and ``probe``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge.collectors.base import Collector, CollectorError
from edge.collectors.pi_webapi import PiTag, PiWebApiCollector, PiWebApiConfig
from edge.config import AgentConfigError, load_agent_config
from edge.readings import Quality, Reading
from edge.transform import Transform
from ingest_service.parameters import ParameterRegistry
from tests import collector_support as support
from tests.pi_webapi_server import PiWebApiServer

PRESSURE = "\\\\PISRV\\WH-001.PT-101"
HOOKLOAD = "\\\\PISRV\\WH-001.WT-201"
TEMPERATURE = "\\\\PISRV\\WH-002.TT-301"
# Times with microseconds, so PI's 7-digit fractions are parsed on every read.
BASE = datetime(2026, 1, 5, 8, 0, 0, 123456, tzinfo=UTC)


def at(i: int) -> datetime:
    return BASE + timedelta(seconds=1.25 * i)


class MemorySink(support.MemorySink):
    """The shared in-memory sink that also checks every watermark against the data emitted
    with or before it: a watermark must be the newest timestamp emitted for its tag."""

    def __init__(self, watermarks: Mapping[str, str] | None = None) -> None:
        super().__init__(watermarks)
        self.ahead: list[str] = []

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        await super().emit(readings, watermarks)
        for key, value in (watermarks or {}).items():
            newest = max((r.timestamp for r in self.readings if r.tag == key), default=None)
            if newest is None or datetime.fromisoformat(value) != newest:
                self.ahead.append(f"{key}: watermark {value}, newest emitted {newest}")

    def of(self, path: str) -> list[Reading]:
        return [r for r in self.readings if r.tag == path]


async def wait_until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(collector: Collector, sink: MemorySink) -> AsyncIterator[asyncio.Task[None]]:
    # Nothing but the cancellation is swallowed: a CollectorError fails the test.
    async with support.running(collector, sink, tolerate=()) as task:
        yield task
    assert sink.ahead == [], "a watermark ran ahead of its data"


async def polls(server: PiWebApiServer, count: int = 3) -> None:
    """Wait until the collector has asked for updates ``count`` more times."""
    target = server.count("GET streamsets/updates") + count
    await wait_until(lambda: server.count("GET streamsets/updates") >= target)


@pytest.fixture
async def pi(tmp_path: Path) -> AsyncIterator[PiWebApiServer]:
    server = PiWebApiServer(tmp_path / "pi")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def source(
    server: PiWebApiServer, tags: Sequence[Mapping[str, Any]], **keys: Any
) -> PiWebApiConfig:
    settings: dict[str, Any] = {
        "name": "pi",
        "base_url": server.base_url,
        "username": server.username,
        "password": server.password,
        "ca_file": server.certificate,
        "poll_interval": "50ms",
        "timeout": "5s",
        "tags": list(tags),
        **keys,
    }
    return PiWebApiConfig.model_validate(settings)


def tag(path: str, parameter: str = "wellhead_pressure", **keys: str) -> dict[str, str]:
    return {"path": path, "parameter": parameter, "well_id": "WELL-001", **keys}


# Configuration ----------------------------------------------------------------------------


def test_the_sample_config_loads_with_its_documented_defaults(tmp_path: Path) -> None:
    config = support.load_sample(tmp_path, "pi_webapi", environ={"PI_WEBAPI_PASSWORD": "pw"})
    [pi] = config.data_sources
    assert isinstance(pi, PiWebApiConfig)
    assert pi.password is not None and pi.password.get_secret_value() == "pw"
    assert (pi.timeout, pi.poll_interval) == (timedelta(seconds=30), timedelta(seconds=5))
    assert (pi.max_recorded_per_request, pi.verify, pi.ca_file) == (10_000, True, None)
    assert [pi.tag_path(t) for t in pi.tags] == [
        "\\\\PI-SERVER\\WH-001.PT-101",
        "\\\\PI-SERVER\\WH-001.WT-201",
        "\\\\PI-SERVER-2\\WH-002.TT-301",
    ]
    assert [t.unit for t in pi.tags] == ["psi", None, "degF"]
    assert isinstance(pi.build(), PiWebApiCollector)


_GOOD: dict[str, Any] = {
    "name": "pi",
    "type": "pi_webapi",
    "base_url": "https://pi.example.com/piwebapi",
    "tags": [{"path": "\\\\S\\T", "parameter": "hookload", "well_id": "W"}],
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tags": [{"tag_name": "T", "parameter": "hookload", "well_id": "W"}]},
         "tags[0] has a tag_name: set data_server"),
        ({"tags": [{"tag_name": "T", "path": "\\\\S\\T", "parameter": "p", "well_id": "W"}]},
         "tags[0]: give either tag_name or path"),
        ({"tags": [{"path": "S\\T", "parameter": "p", "well_id": "W"}]},
         "tags[0].path: must be a PI point path"),
        ({"tags": []}, "tags: must have at least 1 item"),
        ({"username": "u"}, "username and password go together"),
        ({"ca_file": "/ca.pem", "verify": False}, "ca_file applies only with verify: true"),
        ({"base_url": "ftp://pi/piwebapi"}, "base_url: must be an https:// URL"),
        ({"base_url": "https://u:hunter2@pi/piwebapi"}, "must not hold credentials"),
        ({"max_recorded_per_request": 150_001}, "max_recorded_per_request: must be at most 150000"),
        ({"poll_interval": "0s"}, "poll_interval: must be more than"),
        ({"tags": [_GOOD["tags"][0], {**_GOOD["tags"][0], "path": "\\\\s\\t"}]},
         "tags[1] and tags[0] are both"),
        ({"pasword": "x"}, "unknown key; did you mean 'password'?"),
    ],
)
def test_config_problems_are_reported_with_their_path(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(support.agent_file(tmp_path, [{**_GOOD, **change}]), environ={})
    message = str(caught.value)
    assert "data_sources[0] (pi)" in message
    assert expected in message
    assert "hunter2" not in message


# Reading ----------------------------------------------------------------------------------


async def test_lookup_then_current_values_of_many_tags_at_once(pi: PiWebApiServer) -> None:
    for path, units in ((PRESSURE, "psi"), (HOOKLOAD, "klbs"), (TEMPERATURE, "degF")):
        pi.add_point(path, units)
        for i in range(3):
            pi.record(path, at(i), 100.0 + i)
    config = source(
        pi,
        [tag(PRESSURE), tag(HOOKLOAD, "hookload"), tag(TEMPERATURE, "downhole_temperature",
                                                        unit="degC", well_id="WELL-002")],
    )
    sink = MemorySink()
    async with running(config.build(), sink):
        await wait_until(lambda: len(sink.readings) == 3)
        await polls(pi)
    assert pi.count("GET points/multiple") == 1  # looked up once
    assert pi.count("GET streamsets/value") == 1  # all tags in one call
    assert pi.count("GET recorded") == 0
    found = {(r.tag, r.well_id, r.parameter, r.timestamp, r.value, r.unit, r.quality)
             for r in sink.readings}
    assert found == {
        (PRESSURE, "WELL-001", "wellhead_pressure", at(2), 102.0, "psi", Quality.GOOD),
        (HOOKLOAD, "WELL-001", "hookload", at(2), 102.0, "klbs", Quality.GOOD),
        # The configured unit wins over PI's engineering units.
        (TEMPERATURE, "WELL-002", "downhole_temperature", at(2), 102.0, "degC", Quality.GOOD),
    }
    assert sink.watermarks == {p: at(2).isoformat() for p in (PRESSURE, HOOKLOAD, TEMPERATURE)}


async def test_updates_arrive_through_markers_in_order(pi: PiWebApiServer) -> None:
    pi.add_point(PRESSURE, "psi")
    pi.add_point(HOOKLOAD, "klbs")
    pi.record(PRESSURE, at(0), 1.0)
    pi.record(HOOKLOAD, at(0), 1.0)
    sink = MemorySink()
    async with running(source(pi, [tag(PRESSURE), tag(HOOKLOAD, "hookload")]).build(), sink):
        await wait_until(lambda: len(sink.readings) == 2)
        for i in range(1, 21):
            pi.record(PRESSURE, at(i), float(i))
            if i % 2 == 0:
                pi.record(HOOKLOAD, at(i), float(i))
            if i % 5 == 0:
                await polls(pi, 1)
        await wait_until(lambda: len(sink.readings) == 2 + 20 + 10)
        await polls(pi)
    assert [r.timestamp for r in sink.of(PRESSURE)] == [at(i) for i in range(21)]
    assert [r.timestamp for r in sink.of(HOOKLOAD)] == [at(i) for i in range(0, 21, 2)]
    assert pi.count("POST streamsets/updates") == 1
    assert pi.count("GET recorded") == 0  # everything came through the markers
    assert sink.watermarks == {PRESSURE: at(20).isoformat(), HOOKLOAD: at(20).isoformat()}


async def test_an_expired_marker_falls_back_to_recorded_reads_from_the_watermark(
    tmp_path: Path,
) -> None:
    pi = PiWebApiServer(tmp_path / "pi", max_items=5)
    await pi.start()
    try:
        pi.add_point(PRESSURE, "psi")
        pi.add_point(HOOKLOAD, "klbs")
        pi.record(PRESSURE, at(0), 0.0)
        pi.record(HOOKLOAD, at(0), 0.0)
        config = source(pi, [tag(PRESSURE), tag(HOOKLOAD, "hookload")],
                        max_recorded_per_request=5)
        sink = MemorySink()
        async with running(config.build(), sink):
            await wait_until(lambda: len(sink.readings) == 2)
            await polls(pi)
            pi.expire_markers()
            for i in range(1, 13):  # more than two pages of the server's cap
                pi.record(PRESSURE, at(i), float(i))
            await wait_until(lambda: len(sink.of(PRESSURE)) == 13)
            assert pi.count("POST streamsets/updates") == 2  # registered again
            recorded = pi.count("GET recorded")
            assert recorded >= 3
            # After the fallback, new values come through the new markers again.
            pi.record(PRESSURE, at(13), 13.0)
            pi.record(HOOKLOAD, at(13), 13.0)
            await wait_until(lambda: len(sink.readings) == 16)
            await polls(pi)
            assert pi.count("GET recorded") == recorded
    finally:
        await pi.stop()
    # Every value exactly once, in order: nothing lost, nothing repeated.
    assert [r.timestamp for r in sink.of(PRESSURE)] == [at(i) for i in range(14)]
    assert [r.value for r in sink.of(PRESSURE)] == [float(i) for i in range(14)]
    assert [r.timestamp for r in sink.of(HOOKLOAD)] == [at(0), at(13)]


async def test_a_restart_backfills_from_the_watermark_in_pages_under_the_item_cap(
    tmp_path: Path,
) -> None:
    pi = PiWebApiServer(tmp_path / "pi", max_items=7)
    await pi.start()
    try:
        pi.add_point(PRESSURE, "psi")
        pi.add_point(HOOKLOAD, "klbs")
        for i in range(40):
            pi.record(PRESSURE, at(i), float(i))
        pi.record(HOOKLOAD, at(3), 3.0)
        # What an earlier run kept: value 10 of the pressure tag, and the hookload's only one.
        sink = MemorySink({PRESSURE: at(10).isoformat(), HOOKLOAD: at(3).isoformat()})
        config = source(pi, [tag(PRESSURE), tag(HOOKLOAD, "hookload")],
                        max_recorded_per_request=7)
        async with running(config.build(), sink):
            await wait_until(lambda: len(sink.readings) == 29)
            await polls(pi)
    finally:
        await pi.stop()
    assert [r.timestamp for r in sink.of(PRESSURE)] == [at(i) for i in range(11, 40)]
    assert sink.of(HOOKLOAD) == []  # nothing after its watermark
    assert pi.count("GET streamsets/value") == 0  # a watermark means no current-value read
    assert pi.count("GET recorded") >= 29 // 7 + 1  # paged: more values than one page holds
    assert sink.watermarks[PRESSURE] == at(39).isoformat()


async def test_a_page_larger_than_the_item_cap_is_refused_with_advice(tmp_path: Path) -> None:
    pi = PiWebApiServer(tmp_path / "pi", max_items=5)
    await pi.start()
    try:
        pi.add_point(PRESSURE, "psi")
        pi.record(PRESSURE, at(1), 1.0)
        sink = MemorySink({PRESSURE: at(0).isoformat()})
        collector = source(pi, [tag(PRESSURE)], max_recorded_per_request=6).build()
        with pytest.raises(CollectorError) as caught:
            await asyncio.wait_for(collector.run(sink), timeout=15)
    finally:
        await pi.stop()
    assert caught.value.retryable is False
    assert "maximum allowed (5)" in str(caught.value)
    assert "lower max_recorded_per_request" in str(caught.value)
    assert sink.readings == []


@pytest.mark.parametrize(
    ("good", "questionable", "substituted", "quality"),
    [
        (True, False, False, Quality.GOOD),
        (True, True, False, Quality.UNCERTAIN),
        (True, False, True, Quality.UNCERTAIN),
        (True, True, True, Quality.UNCERTAIN),
        (False, False, False, Quality.BAD),
        (False, True, False, Quality.BAD),
        (False, False, True, Quality.BAD),
    ],
)
async def test_quality_follows_good_questionable_and_substituted(
    pi: PiWebApiServer, good: bool, questionable: bool, substituted: bool, quality: Quality
) -> None:
    pi.add_point(PRESSURE, "psi")
    pi.record(PRESSURE, at(1), 1.0)
    pi.record(PRESSURE, at(2), 2.0, good=good, questionable=questionable,
              substituted=substituted)
    sink = MemorySink({PRESSURE: at(0).isoformat()})
    async with running(source(pi, [tag(PRESSURE)]).build(), sink):
        await wait_until(lambda: len(sink.readings) == 2)
    assert [(r.value, r.quality) for r in sink.readings] == [
        (1.0, Quality.GOOD), (2.0, quality)
    ]


async def test_digital_states_are_bad_readings_without_a_value(pi: PiWebApiServer) -> None:
    pi.add_point(PRESSURE, "psi")
    shutdown = {"Name": "Shutdown", "Value": 254, "IsSystem": True}
    running_state = {"Name": "Running", "Value": 1, "IsSystem": False}
    pi.record(PRESSURE, at(1), 10.0)
    pi.record(PRESSURE, at(2), shutdown, good=False)
    pi.record(PRESSURE, at(3), running_state)  # a digital set's own state: Good, yet no number
    pi.record(PRESSURE, at(4), "I/O Timeout")
    pi.record(PRESSURE, at(5), 11.0)
    sink = MemorySink({PRESSURE: at(0).isoformat()})
    async with running(source(pi, [tag(PRESSURE)]).build(), sink):
        await wait_until(lambda: len(sink.readings) == 5)
    assert [(r.value, r.quality) for r in sink.readings] == [
        (10.0, Quality.GOOD),
        (None, Quality.BAD),
        (None, Quality.BAD),
        (None, Quality.BAD),
        (11.0, Quality.GOOD),
    ]
    assert sink.watermarks[PRESSURE] == at(5).isoformat()
    result = Transform(ParameterRegistry.with_extra(()), "pi").apply(sink.readings)
    assert (len(result.points), result.skipped["no_value"]) == (2, 3)


async def test_a_point_without_data_gives_no_value_and_its_first_value_follows(
    pi: PiWebApiServer,
) -> None:
    pi.add_point(PRESSURE, "psi")  # "Pt Created": a system state at 1970
    sink = MemorySink()
    async with running(source(pi, [tag(PRESSURE)]).build(), sink):
        await wait_until(lambda: len(sink.readings) == 1)
        pi.record(PRESSURE, at(1), 5.0)
        await wait_until(lambda: len(sink.readings) == 2)
    assert [(r.value, r.quality) for r in sink.readings] == [(None, Quality.BAD),
                                                             (5.0, Quality.GOOD)]


async def test_an_unknown_tag_is_reported_once_and_the_others_go_on(
    pi: PiWebApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    missing = "\\\\PISRV\\NO-SUCH-TAG"
    pi.add_point(PRESSURE, "psi")
    pi.add_point(HOOKLOAD, "klbs")
    pi.record(PRESSURE, at(0), 1.0)
    pi.record(HOOKLOAD, at(0), 1.0)
    config = source(pi, [tag(PRESSURE), tag(missing), tag(HOOKLOAD, "hookload")])
    sink = MemorySink()
    with caplog.at_level(logging.INFO, logger="edge.collectors.pi_webapi"):
        async with running(config.build(), sink):
            await wait_until(lambda: len(sink.readings) == 2)
            pi.record(PRESSURE, at(1), 2.0)
            pi.record(HOOKLOAD, at(1), 2.0)
            await wait_until(lambda: len(sink.readings) == 4)
            await polls(pi, 5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert missing in errors[0].getMessage()
    assert "PI Point not found" in errors[0].getMessage()
    assert {r.tag for r in sink.readings} == {PRESSURE, HOOKLOAD}


async def test_no_known_tag_at_all_fails_the_run(pi: PiWebApiServer) -> None:
    collector = source(pi, [tag("\\\\PISRV\\GONE")]).build()
    with pytest.raises(CollectorError, match="none of the 1 tags exists") as caught:
        await asyncio.wait_for(collector.run(MemorySink()), timeout=15)
    assert caught.value.retryable is False


# Failures ---------------------------------------------------------------------------------


async def test_refused_credentials_are_a_clear_permanent_error(pi: PiWebApiServer) -> None:
    pi.add_point(PRESSURE, "psi")
    config = source(pi, [tag(PRESSURE)], password="wrong-password")
    for attempt in (config.build().run(MemorySink()), config.build().probe()):
        with pytest.raises(CollectorError) as caught:
            await asyncio.wait_for(attempt, timeout=15)
        message = str(caught.value)
        assert caught.value.retryable is False
        assert "HTTP 401" in message and "user 'piuser'" in message
        assert "check username and password" in message
        assert "wrong-password" not in message


async def test_server_errors_are_retryable_and_a_restart_resumes_without_duplicates(
    pi: PiWebApiServer,
) -> None:
    pi.add_point(PRESSURE, "psi")
    pi.record(PRESSURE, at(0), 0.0)
    sink = MemorySink()
    config = source(pi, [tag(PRESSURE)])
    task = asyncio.create_task(config.build().run(sink))
    await wait_until(lambda: len(sink.readings) == 1)
    await polls(pi)
    pi.fail_next = [503]
    with pytest.raises(CollectorError, match="HTTP 503") as caught:
        await asyncio.wait_for(task, timeout=15)
    assert caught.value.retryable is True
    # Values archived while the collector was down come from the recorded read, once.
    for i in range(1, 4):
        pi.record(PRESSURE, at(i), float(i))
    async with running(config.build(), sink):
        await wait_until(lambda: len(sink.readings) == 4)
        pi.record(PRESSURE, at(4), 4.0)
        await wait_until(lambda: len(sink.readings) == 5)
        await polls(pi)
    assert [r.timestamp for r in sink.readings] == [at(i) for i in range(5)]


async def test_probe_says_what_it_found_or_why_not(pi: PiWebApiServer, tmp_path: Path) -> None:
    pi.add_point(PRESSURE, "psi")
    pi.add_point(HOOKLOAD, "klbs")
    found = await source(pi, [tag(PRESSURE), tag(HOOKLOAD, "hookload")]).build().probe()
    assert found == f"PI Web API at {pi.base_url} as piuser: all 2 tags found"

    with pytest.raises(CollectorError) as caught:
        await source(pi, [tag(PRESSURE), tag("\\\\PISRV\\GONE")]).build().probe()
    assert "1 of 2 tags not found: \\\\PISRV\\GONE: PI Point not found" in str(caught.value)

    # Without the CA file the self-signed certificate is not trusted.
    with pytest.raises(CollectorError, match="certificate is not trusted") as caught:
        await source(pi, [tag(PRESSURE)], ca_file=None).build().probe()
    assert caught.value.retryable is False
    assert "set ca_file" in str(caught.value)
    # verify: false accepts it (for a test server).
    assert "all 1 tags found" in await source(
        pi, [tag(PRESSURE)], ca_file=None, verify=False
    ).build().probe()

    closed = pi.port
    await pi.stop()
    with pytest.raises(CollectorError) as caught:
        await source(pi, [tag(PRESSURE)]).build().probe()
    assert caught.value.retryable is True
    assert f"localhost:{closed}" in str(caught.value)


def test_the_tag_model_is_strict() -> None:
    assert PiTag(path="\\\\S\\T", parameter="hookload", well_id="W").unit is None
    with pytest.raises(ValueError, match="without backslashes"):
        PiTag(tag_name="S\\T", parameter="hookload", well_id="W")

