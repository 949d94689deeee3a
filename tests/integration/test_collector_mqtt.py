"""The ``mqtt`` collector against this machine's Mosquitto (127.0.0.1:1883), each test on its
own topic prefix and client ids: the JSON mapping, messages kept by the broker while the agent
is down, acknowledgement only after buffering, Sparkplug B births, data by alias, a sequence gap
answered by a rebirth request, bad payloads counted and skipped, TLS with a user, ``probe``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.collectors.base import CollectorError
from edge.collectors.mqtt import REBIRTH_METRIC, Mqtt, MqttConfig, parse_timestamp
from edge.collectors.mqtt._schema import payload_class
from edge.readings import Quality, Reading
from tests.collector_support import MemorySink, load_sample, sample_text
from tests.collector_support import running as running_task

BROKER = ("127.0.0.1", 1883)
ROOT = Path(__file__).parents[2]
PAGE = ROOT / "docs" / "collectors" / "mqtt.md"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def broker_up() -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(BROKER) == 0


pytestmark = pytest.mark.skipif(not broker_up(), reason="no MQTT broker on 127.0.0.1:1883")


class RecordingSink(MemorySink):
    """A ``ReadingSink`` that keeps what it is given; ``hold`` makes ``emit`` wait."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await super().emit(readings, watermarks)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def prefix() -> str:
    return f"wt-test/{secrets.token_hex(4)}"


@pytest.fixture
async def client_ids() -> AsyncIterator[list[str]]:
    """Client ids a test uses for persistent sessions; their sessions are removed after."""
    ids: list[str] = []
    yield ids
    for identifier in ids:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(*BROKER, identifier=identifier, clean_session=True):
                pass


@contextlib.asynccontextmanager
async def publisher() -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(*BROKER, identifier=f"wt-pub-{secrets.token_hex(4)}") as client:
        yield client


@contextlib.asynccontextmanager
async def running(collector: Mqtt, sink: RecordingSink) -> AsyncIterator[asyncio.Task[None]]:
    """``collector`` running into ``sink``, once it has subscribed."""
    async with running_task(collector, sink) as task:
        await asyncio.wait_for(_subscribed(collector, task), timeout=10)
        yield task


async def _subscribed(collector: Mqtt, task: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(collector.subscribed.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises what stopped it


def make_config(client_ids: list[str], **keys: Any) -> MqttConfig:
    identifier = f"wt-agent-{secrets.token_hex(4)}"
    client_ids.append(identifier)
    return MqttConfig.model_validate(
        {"name": "broker", "type": "mqtt", "host": BROKER[0], "port": BROKER[1],
         "client_id": identifier, **keys}
    )


def ms(instant: datetime) -> int:
    return (instant - EPOCH) // timedelta(milliseconds=1)


# --- JSON -------------------------------------------------------------------------------


async def test_json_topics_map_to_readings(prefix: str, client_ids: list[str]) -> None:
    config = make_config(
        client_ids,
        topics=[
            {
                "topic": f"{prefix}/site/+/wellhead",
                "well_id_topic_level": 3,
                "timestamp_field": "ts",
                "quality_field": "q",
                "values": [
                    {"field": "pressure", "parameter": "wellhead_pressure", "unit": "bar"},
                    {"field": "data.temp", "parameter": "downhole_temperature", "unit": "degC"},
                ],
            },
            {
                "topic": f"{prefix}/rig/#",
                "well_id_field": "well",
                "timestamp_field": "t",
                "timestamp_format": "epoch_ms",
                "values": [{"field": "hookload", "parameter": "hookload", "unit": "klbs"}],
            },
            {
                "topic": f"{prefix}/plain",
                "well_id": "W-9",
                "values": [{"field": "flow", "parameter": "flow_rate", "unit": "bbl/day"}],
            },
        ],
    )
    collector = Mqtt(config)
    sink = RecordingSink()
    async with running(collector, sink), publisher() as pub:
        before = datetime.now(UTC)
        await pub.publish(
            f"{prefix}/site/W-1/wellhead",
            b'{"ts": "2026-01-02T03:04:05.123Z", "pressure": 101.5, "data": {"temp": 88},'
            b' "q": "Uncertain"}',
            qos=1,
        )
        await pub.publish(
            f"{prefix}/site/W-2/wellhead",
            b'{"ts": "2026-01-02T04:04:05+01:00", "pressure": "99.25", "data": {"temp": null}}',
            qos=1,
        )
        await pub.publish(
            f"{prefix}/rig/7",
            b'[{"well": "W-3", "t": 1767225600000, "hookload": 250},'
            b' {"well": "W-4", "t": 1767225601500, "hookload": 251.5}]',
            qos=1,
        )
        await pub.publish(f"{prefix}/plain", b'{"flow": 1200}', qos=1)
        await wait_until(lambda: len(sink.readings) >= 7)
        after = datetime.now(UTC)
    by_key = {(r.well_id, r.parameter): r for r in sink.readings}
    assert len(by_key) == len(sink.readings) == 7
    jan2 = datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    assert by_key["W-1", "wellhead_pressure"] == Reading(
        "W-1", "wellhead_pressure", jan2, 101.5, "bar", Quality.UNCERTAIN,
        f"{prefix}/site/W-1/wellhead:pressure",
    )
    assert by_key["W-1", "downhole_temperature"].value == 88.0
    w2 = by_key["W-2", "wellhead_pressure"]
    assert (w2.value, w2.timestamp, w2.quality) == (
        99.25, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), Quality.GOOD
    )
    # JSON null: a reading without a value (the agent counts it and sends nothing).
    assert by_key["W-2", "downhole_temperature"].value is None
    assert by_key["W-3", "hookload"].timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert by_key["W-4", "hookload"].value == 251.5
    assert by_key["W-4", "hookload"].timestamp == datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
    # Without a timestamp field: the time the agent received it.
    plain = by_key["W-9", "flow_rate"]
    assert before <= plain.timestamp <= after and plain.value == 1200.0
    assert collector.stats.bad_payloads == 0
    # The watermark of each subscription: its newest reading, for the log after a restart.
    assert sink.watermarks[f"last_message:{prefix}/rig/#"] == "2026-01-01T00:00:01.500000+00:00"


async def test_messages_sent_while_the_agent_is_down_arrive_after_restart(
    prefix: str, client_ids: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"{prefix}/wells/W-1"
    config = make_config(
        client_ids,
        topics=[{"topic": f"{prefix}/wells/+", "well_id_topic_level": 3, "timestamp_field": "t",
                 "timestamp_format": "epoch_s",
                 "values": [{"field": "p", "parameter": "wellhead_pressure", "unit": "psi"}]}],
    )
    sink = RecordingSink()
    async with publisher() as pub:
        async with running(Mqtt(config), sink):
            for i in range(3):
                await pub.publish(topic, f'{{"t": {1000 + i}, "p": {i}}}', qos=1)
            await wait_until(lambda: len(sink.readings) == 3)
        # The agent is down: the broker keeps these for its session.
        for i in range(3, 8):
            await pub.publish(topic, f'{{"t": {1000 + i}, "p": {i}}}', qos=1)
        with caplog.at_level(logging.INFO, logger="edge.collectors.mqtt"):
            async with running(Mqtt(config), sink):
                await wait_until(lambda: len(sink.readings) == 8)
    assert [r.value for r in sink.readings] == [float(i) for i in range(8)]
    assert [r.timestamp for r in sink.readings] == [
        EPOCH + timedelta(seconds=1000 + i) for i in range(8)
    ]
    assert "the last reading before this start was at 1970-01-01T00:16:42+00:00" in caplog.text


async def test_a_message_is_acknowledged_only_once_buffered(
    prefix: str, client_ids: list[str]
) -> None:
    config = make_config(
        client_ids,
        topics=[{"topic": f"{prefix}/x", "well_id": "W-1", "timestamp_field": "t",
                 "values": [{"field": "p", "parameter": "hookload", "unit": "klbs"}]}],
    )
    stuck = RecordingSink()
    stuck.hold = asyncio.Event()  # the buffer never confirms
    collector = Mqtt(config)
    async with running(collector, stuck), publisher() as pub:
        await pub.publish(f"{prefix}/x", b'{"t": "2026-03-01T00:00:00Z", "p": 7}', qos=1)
        await wait_until(lambda: collector.stats.messages == 1)
    assert collector.stats.acknowledged == 0
    # Stopped before the readings were durable: the broker delivers the message again.
    sink = RecordingSink()
    again = Mqtt(config)
    async with running(again, sink):
        await wait_until(lambda: len(sink.readings) == 1)
        await wait_until(lambda: again.stats.acknowledged == 1)
    assert sink.readings[0].value == 7.0


async def test_bad_payloads_are_counted_skipped_and_logged_once_per_episode(
    prefix: str, client_ids: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        client_ids,
        topics=[{"topic": f"{prefix}/j/+", "well_id_topic_level": 3, "timestamp_field": "t",
                 "values": [{"field": "p", "parameter": "hookload", "unit": "klbs"}]}],
        sparkplug=[{"group_id": f"G{prefix[-8:]}", "well_id": "W-1", "request_rebirth": False,
                    "metrics": [{"name": "m", "parameter": "hookload", "unit": "klbs"}]}],
    )
    good = b'{"t": "2026-03-01T00:00:00Z", "p": 1}'
    sequence = [
        (f"{prefix}/j/A", b"not json"),
        (f"{prefix}/j/A", b"{broken"),
        (f"{prefix}/j/A", b"[1, 2]"),
        (f"{prefix}/j/B", b'{"t": "yesterday", "p": 1}'),
        (f"{prefix}/j/B", b'{"t": "2026-03-01T00:00:00Z", "p": "lots"}'),
        (f"{prefix}/j/B", b'{"t": "2026-03-01T00:00:00Z"}'),
        (f"{prefix}/j/A", good),
        (f"{prefix}/j/A", b"\xff\xfe"),
        (f"spBv1.0/G{prefix[-8:]}/NDATA/node1", b"\xff\xff\xff"),
        (f"{prefix}/j/B", good.replace(b"1}", b"2}")),
    ]
    collector = Mqtt(config)
    sink = RecordingSink()
    with caplog.at_level(logging.INFO, logger="edge.collectors.mqtt"):
        async with running(collector, sink), publisher() as pub:
            for topic, payload in sequence:
                await pub.publish(topic, payload, qos=1)
            await wait_until(lambda: collector.stats.messages == len(sequence))
    stats = collector.stats
    assert [r.value for r in sink.readings] == [1.0, 2.0]
    assert stats.bad_payloads == 8
    assert stats.problems == {
        "not_json": 3, "not_an_object": 2, "bad_timestamp": 1, "not_numeric": 1,
        "missing_field": 1, "not_sparkplug": 1,
    }
    assert sink.rejected == stats.problems  # the agent's ingestion_source_records_rejected_total
    warnings = [r.getMessage() for r in caplog.records if "bad payload" in r.getMessage()]
    # A: one episode, then good, then a second; B: one episode; the Sparkplug topic: one.
    assert [w.split(": ")[1] for w in warnings] == [
        f"{prefix}/j/A", f"{prefix}/j/B", f"{prefix}/j/A", f"spBv1.0/G{prefix[-8:]}/NDATA/node1"
    ]
    recovered = [r.getMessage() for r in caplog.records if "good payloads again" in r.getMessage()]
    assert recovered == [
        f"mqtt broker: {prefix}/j/A: good payloads again after 3 bad ones",
        f"mqtt broker: {prefix}/j/B: good payloads again after 3 bad ones",
    ]
    # Bad payloads are acknowledged too: they would be just as bad delivered again.
    assert stats.acknowledged == len(sequence)


def test_timestamp_formats() -> None:
    assert parse_timestamp("2026-01-02T03:04:05", "iso8601") == datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=UTC
    )
    assert parse_timestamp("2026-01-02T03:04:05-02:00", "iso8601").hour == 5
    assert parse_timestamp(1.5, "epoch_s") == EPOCH + timedelta(seconds=1.5)
    assert parse_timestamp("1500", "epoch_ms") == EPOCH + timedelta(seconds=1.5)
    for bad, fmt in ((True, "epoch_s"), (1e300, "epoch_ms"), (12, "iso8601"),
                     ("soon", "iso8601"), (float("nan"), "epoch_s")):
        with pytest.raises((ValueError, OverflowError)):
            parse_timestamp(bad, fmt)


# --- Sparkplug B ------------------------------------------------------------------------

FLOAT, DOUBLE, INT16, INT64, UINT64, BOOLEAN, STRING = 9, 10, 2, 4, 8, 11, 12


def payload(seq: int | None, *metrics: dict[str, Any], timestamp: int | None = None) -> bytes:
    message = payload_class()()
    if seq is not None:
        message.seq = seq
    if timestamp is not None:
        message.timestamp = timestamp
    for fields in metrics:
        metric = message.metrics.add()
        for key, value in fields.items():
            if key == "quality":
                metric.properties.keys.append("Quality")
                metric.properties.values.add(type=3, int_value=value)
            else:
                setattr(metric, key, value)
    return bytes(message.SerializeToString())


@contextlib.asynccontextmanager
async def commands(group: str) -> AsyncIterator[list[Any]]:
    """Every NCMD published to ``group``'s nodes, decoded, as (node, payload)."""
    received: list[Any] = []
    async with aiomqtt.Client(*BROKER, identifier=f"wt-cmd-{secrets.token_hex(4)}") as client:
        await client.subscribe(f"spBv1.0/{group}/NCMD/+", qos=1)

        async def listen() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append(
                    (str(message.topic).split("/")[3],
                     payload_class().FromString(message.payload))
                )

        task = asyncio.create_task(listen())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def sparkplug_config(client_ids: list[str], group: str, **group_keys: Any) -> MqttConfig:
    return make_config(
        client_ids,
        sparkplug=[
            {
                "group_id": group,
                "well_id_from": "device",
                "metrics": [
                    {"name": "Rig/Hookload", "parameter": "hookload", "unit": "klbs",
                     "well_id": "RIG-WELL"},
                    {"name": "Wellhead/Pressure", "parameter": "wellhead_pressure",
                     "unit": "psi"},
                    {"name": "Downhole/Temp", "parameter": "downhole_temperature",
                     "unit": "degC"},
                    {"name": "Flow", "parameter": "flow_rate", "unit": "bbl/day",
                     "device": "WELL-B"},
                ],
                **group_keys,
            }
        ],
    )


async def test_sparkplug_births_and_data_by_alias(client_ids: list[str]) -> None:
    group = f"G-{secrets.token_hex(4)}"
    config = sparkplug_config(client_ids, group)
    base = f"spBv1.0/{group}"
    t0 = ms(datetime(2026, 2, 1, tzinfo=UTC))
    messages = [
        (f"{base}/NBIRTH/rig1", payload(
            0,
            {"name": "bdSeq", "datatype": UINT64, "long_value": 3},
            {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": False},
            {"name": "Rig/Hookload", "alias": 1, "datatype": FLOAT, "float_value": 250.5,
             "timestamp": t0},
            timestamp=t0,
        )),
        (f"{base}/DBIRTH/rig1/WELL-A", payload(
            1,
            {"name": "Wellhead/Pressure", "alias": 10, "datatype": DOUBLE,
             "double_value": 2500.25, "timestamp": t0},
            {"name": "Downhole/Temp", "alias": 11, "datatype": INT16,
             "int_value": (-5) & 0xFFFFFFFF, "timestamp": t0},
            {"name": "Label", "alias": 12, "datatype": STRING, "string_value": "x"},
        )),
        (f"{base}/DBIRTH/rig1/WELL-B", payload(
            2,
            {"name": "Flow", "alias": 20, "datatype": INT64,
             "long_value": (-7) & 0xFFFFFFFFFFFFFFFF, "timestamp": t0},
        )),
        # Data by alias only, with the metric's own time.
        (f"{base}/NDATA/rig1", payload(3, {"alias": 1, "float_value": 251.0,
                                           "timestamp": t0 + 1000})),
        # A historical value (stored and forwarded by the node): emitted like the others.
        (f"{base}/DDATA/rig1/WELL-A", payload(
            4, {"alias": 10, "double_value": 2400.0, "timestamp": t0 - 60_000,
                "is_historical": True},
            {"alias": 11, "int_value": 40, "timestamp": t0 + 2000, "quality": 64},
        )),
        # No metric timestamp: the payload's.
        (f"{base}/DDATA/rig1/WELL-B", payload(5, {"alias": 20, "long_value": 9},
                                              timestamp=t0 + 3000)),
        (f"{base}/DDATA/rig1/WELL-A", payload(6, {"alias": 10, "is_null": True,
                                                  "timestamp": t0 + 4000},
                                              {"alias": 12, "string_value": "y"},
                                              {"alias": 10, "double_value": 1.0,
                                               "timestamp": t0 + 5000, "is_transient": True})),
    ]
    collector = Mqtt(config)
    sink = RecordingSink()
    async with commands(group) as ncmd, running(collector, sink), publisher() as pub:
        for topic, body in messages:
            await pub.publish(topic, body, qos=0)
        await wait_until(lambda: collector.stats.messages == len(messages))
    got = [(r.well_id, r.parameter, r.timestamp, r.value, r.quality, r.tag)
           for r in sink.readings]

    def at(millis: int) -> datetime:
        return EPOCH + timedelta(milliseconds=millis)

    good, bad = Quality.GOOD, Quality.BAD
    assert got == [
        ("RIG-WELL", "hookload", at(t0), 250.5, good, "rig1/Rig/Hookload"),
        ("WELL-A", "wellhead_pressure", at(t0), 2500.25, good, "rig1/WELL-A/Wellhead/Pressure"),
        ("WELL-A", "downhole_temperature", at(t0), -5.0, good, "rig1/WELL-A/Downhole/Temp"),
        ("WELL-B", "flow_rate", at(t0), -7.0, good, "rig1/WELL-B/Flow"),
        ("RIG-WELL", "hookload", at(t0 + 1000), 251.0, good, "rig1/Rig/Hookload"),
        ("WELL-A", "wellhead_pressure", at(t0 - 60_000), 2400.0, good,
         "rig1/WELL-A/Wellhead/Pressure"),
        ("WELL-A", "downhole_temperature", at(t0 + 2000), 40.0, Quality.UNCERTAIN,
         "rig1/WELL-A/Downhole/Temp"),
        ("WELL-B", "flow_rate", at(t0 + 3000), 9.0, good, "rig1/WELL-B/Flow"),
        ("WELL-A", "wellhead_pressure", at(t0 + 4000), None, bad,
         "rig1/WELL-A/Wellhead/Pressure"),
    ]
    stats = collector.stats
    assert stats.bad_payloads == 0
    assert stats.ignored["unmapped_metric"] == 4  # bdSeq, Node Control/Rebirth, Label twice
    assert stats.ignored["transient"] == 1
    # The sequence had no gap and every birth was seen: nothing was asked of the node.
    assert stats.rebirth_requests == 0 and ncmd == []


async def test_a_seq_gap_or_data_before_birth_asks_the_node_for_a_rebirth(
    client_ids: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    group = f"G-{secrets.token_hex(4)}"
    config = sparkplug_config(client_ids, group)
    base = f"spBv1.0/{group}"

    def birth(seq: int) -> bytes:
        return payload(seq, {"name": "bdSeq", "datatype": UINT64, "long_value": 1},
                       {"name": "Rig/Hookload", "alias": 1, "datatype": FLOAT,
                        "float_value": 1.0, "timestamp": 1_000})

    messages = [
        # A node whose birth the agent never saw: its alias cannot be resolved.
        (f"{base}/NDATA/rig2", payload(17, {"alias": 1, "float_value": 5.0, "timestamp": 500})),
        (f"{base}/NBIRTH/rig1", birth(0)),
        (f"{base}/NDATA/rig1", payload(1, {"alias": 1, "float_value": 2.0, "timestamp": 2_000})),
        # seq 2 and 3 lost: a gap; the data itself is still good.
        (f"{base}/NDATA/rig1", payload(4, {"alias": 1, "float_value": 3.0, "timestamp": 3_000})),
        # Another gap right after: the request is not repeated while the node is due to rebirth.
        (f"{base}/NDATA/rig1", payload(9, {"alias": 1, "float_value": 4.0, "timestamp": 4_000})),
        # The rebirth, then a sequence that wraps from 255 to 0 without a gap.
        (f"{base}/NBIRTH/rig1", birth(254)),
        (f"{base}/NDATA/rig1", payload(255, {"alias": 1, "float_value": 5.0, "timestamp": 5_000})),
        (f"{base}/NDATA/rig1", payload(0, {"alias": 1, "float_value": 6.0, "timestamp": 6_000})),
    ]
    collector = Mqtt(config)
    sink = RecordingSink()
    with caplog.at_level(logging.WARNING, logger="edge.collectors.mqtt"):
        async with commands(group) as ncmd, running(collector, sink), publisher() as pub:
            for topic, body in messages:
                await pub.publish(topic, body, qos=0)
            # (With MQTT 3.1.1 the agent's own requests come back to it, and are ignored.)
            await wait_until(
                lambda: collector.stats.messages - collector.stats.ignored["command"]
                == len(messages)
            )
            await wait_until(lambda: len(ncmd) == collector.stats.rebirth_requests == 2)
            # After the rebirth a new gap is asked about again.
            await pub.publish(f"{base}/NDATA/rig1",
                              payload(7, {"alias": 1, "float_value": 7.0, "timestamp": 7_000}))
            await wait_until(lambda: len(ncmd) == 3)
    assert [node for node, _ in ncmd] == ["rig2", "rig1", "rig1"]
    for _, request in ncmd:
        [metric] = request.metrics
        assert (metric.name, metric.datatype, metric.boolean_value) == (
            REBIRTH_METRIC, BOOLEAN, True
        )
    assert [r.value for r in sink.readings] == [1.0, 2.0, 3.0, 4.0, 1.0, 5.0, 6.0, 7.0]
    assert collector.stats.ignored["unknown_alias"] == 1
    assert collector.stats.ignored["seq_gap"] == 3
    assert "seq 4 where 2 was due" in caplog.text
    assert "no birth of it seen" in caplog.text


async def test_births_kept_across_a_restart_are_trusted_only_if_seq_goes_on(
    client_ids: list[str],
) -> None:
    group = f"G-{secrets.token_hex(4)}"
    config = sparkplug_config(client_ids, group)
    base = f"spBv1.0/{group}"

    def data(seq: int, value: float) -> tuple[str, bytes]:
        return f"{base}/NDATA/rig1", payload(
            seq, {"alias": 1, "float_value": value, "timestamp": 1000 * seq}
        )

    birth = (f"{base}/NBIRTH/rig1", payload(
        0, {"name": "bdSeq", "datatype": UINT64, "long_value": 1},
        {"name": "Rig/Hookload", "alias": 1, "datatype": FLOAT, "float_value": 0.0,
         "timestamp": 0},
    ))
    sink = RecordingSink()  # the buffer: its watermarks outlive each run

    async def run(messages: list[tuple[str, bytes]]) -> Mqtt:
        collector = Mqtt(config)
        async with running(collector, sink), publisher() as pub:
            for topic, body in messages:
                await pub.publish(topic, body, qos=0)
            await wait_until(
                lambda: collector.stats.messages - collector.stats.ignored["command"]
                == len(messages)
            )
        return collector

    first = await run([birth, data(1, 1.0), data(2, 2.0)])
    assert f"sparkplug:{group}/rig1" in sink.watermarks
    # Restarted, and the node's sequence goes on: its aliases are known without a rebirth.
    second = await run([data(3, 3.0)])
    assert second.stats.rebirth_requests == 0
    # Restarted after a gap: the kept births may be outdated, so alias data waits for a birth.
    async with commands(group) as ncmd:
        third = await run([data(7, 7.0), birth, data(1, 8.0)])
        await wait_until(lambda: len(ncmd) == 1)
    assert third.stats.ignored["unknown_alias"] == 1
    assert [r.value for r in sink.readings] == [0.0, 1.0, 2.0, 3.0, 0.0, 8.0]
    assert first.stats.rebirth_requests == 0 and third.stats.rebirth_requests == 1


async def test_a_stale_death_is_ignored_and_a_real_one_forgets_the_aliases(
    client_ids: list[str],
) -> None:
    group = f"G-{secrets.token_hex(4)}"
    config = sparkplug_config(client_ids, group, request_rebirth=False)
    base = f"spBv1.0/{group}"
    messages = [
        (f"{base}/NBIRTH/rig1", payload(0, {"name": "bdSeq", "datatype": UINT64, "long_value": 5},
                                        {"name": "Rig/Hookload", "alias": 1, "datatype": FLOAT,
                                         "float_value": 1.0, "timestamp": 1_000})),
        (f"{base}/NDEATH/rig1", payload(None, {"name": "bdSeq", "datatype": UINT64,
                                               "long_value": 4})),
        (f"{base}/NDATA/rig1", payload(1, {"alias": 1, "float_value": 2.0, "timestamp": 2_000})),
        (f"{base}/NDEATH/rig1", payload(None, {"name": "bdSeq", "datatype": UINT64,
                                               "long_value": 5})),
        (f"{base}/NDATA/rig1", payload(2, {"alias": 1, "float_value": 3.0, "timestamp": 3_000})),
    ]
    collector = Mqtt(config)
    sink = RecordingSink()
    async with running(collector, sink), publisher() as pub:
        for topic, body in messages:
            await pub.publish(topic, body, qos=0)
        await wait_until(lambda: collector.stats.messages == len(messages))
    assert [r.value for r in sink.readings] == [1.0, 2.0]
    assert collector.stats.ignored["stale_death"] == 1
    assert collector.stats.ignored["unknown_alias"] == 1
    assert collector.stats.rebirth_requests == 0  # request_rebirth: false


# --- probe, TLS, configuration ----------------------------------------------------------


async def test_probe(prefix: str, client_ids: list[str]) -> None:
    topics = [{"topic": f"{prefix}/#", "well_id": "W", "values": [
        {"field": "p", "parameter": "hookload", "unit": "klbs"}]}]
    text = await Mqtt(make_config(client_ids, topics=topics)).probe()
    assert text == "127.0.0.1:1883: MQTT 3.1.1, no TLS, 1 subscriptions granted"
    text = await Mqtt(make_config(client_ids, topics=topics, protocol="5")).probe()
    assert text.startswith("127.0.0.1:1883: MQTT 5, no TLS")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = make_config(client_ids, topics=topics, port=port)
    with pytest.raises(CollectorError) as error:
        await Mqtt(config).probe()
    assert error.value.retryable and f"127.0.0.1:{port}" in str(error.value)


async def test_mqtt5_session_keeps_messages_too(prefix: str, client_ids: list[str]) -> None:
    config = make_config(
        client_ids, protocol="5", session_expiry="1h",
        topics=[{"topic": f"{prefix}/v5", "well_id": "W-5", "timestamp_field": "t",
                 "timestamp_format": "epoch_s",
                 "values": [{"field": "p", "parameter": "hookload", "unit": "klbs"}]}],
    )
    sink = RecordingSink()
    async with publisher() as pub:
        async with running(Mqtt(config), sink):
            await pub.publish(f"{prefix}/v5", b'{"t": 1, "p": 1}', qos=1)
            await wait_until(lambda: len(sink.readings) == 1)
        await pub.publish(f"{prefix}/v5", b'{"t": 2, "p": 2}', qos=1)
        async with running(Mqtt(config), sink):
            await wait_until(lambda: len(sink.readings) == 2)
    assert [r.value for r in sink.readings] == [1.0, 2.0]


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None,
    *, ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_pem(path: Path, certificate: x509.Certificate | None = None, key: Any = None) -> Path:
    if certificate is not None:
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    return path


@pytest.fixture
def tls_broker() -> Iterator[dict[str, Any]]:
    """A Mosquitto of this test's own, on a free loopback port: TLS with client certificates
    required, and one user with a password."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto is not installed")
    # Not under pytest's tmp dir: run as root, mosquitto drops to its own account and must
    # still read these files.
    folder = Path(tempfile.mkdtemp(prefix="wt-mqtt-tls-"))
    folder.chmod(0o755)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("wt-test-ca", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, (ca, ca_key), ca=False)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("wt-agent", client_key, (ca, ca_key), ca=False)
    files = {
        "ca_file": _write_pem(folder / "ca.pem", ca),
        "server_cert": _write_pem(folder / "server.pem", server),
        "server_key": _write_pem(folder / "server.key", key=server_key),
        "cert_file": _write_pem(folder / "client.pem", client),
        "key_file": _write_pem(folder / "client.key", key=client_key),
    }
    passwords = folder / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", "pa$$word"], check=True,
        capture_output=True,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {files['ca_file']}\ncertfile {files['server_cert']}\n"
        f"keyfile {files['server_key']}\nrequire_certificate true\n"
        f"allow_anonymous false\npassword_file {passwords}\npersistence false\n"
    )
    for path in folder.iterdir():
        path.chmod(0o644)
    log = (folder / "mosquitto.log").open("wb")
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                output = (folder / "mosquitto.log").read_text()
                raise RuntimeError(f"mosquitto did not start: {output}")
            time.sleep(0.05)
        yield {"port": port, **{k: str(v) for k, v in files.items()}}
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_tls_with_a_client_certificate_and_a_password(
    tls_broker: dict[str, Any], client_ids: list[str]
) -> None:
    keys = {
        "host": "localhost", "port": tls_broker["port"], "username": "agent",
        "topics": [{"topic": "wells/+", "well_id_topic_level": 1, "timestamp_field": "t",
                    "values": [{"field": "p", "parameter": "hookload", "unit": "klbs"}]}],
    }
    tls = {"enabled": True, "ca_file": tls_broker["ca_file"],
           "cert_file": tls_broker["cert_file"], "key_file": tls_broker["key_file"]}
    config = make_config(client_ids, **keys, password="pa$$word", tls=tls)
    assert (await Mqtt(config).probe()).endswith("MQTT 3.1.1, TLS, 1 subscriptions granted")
    sink = RecordingSink()
    async with running(Mqtt(config), sink):
        context = Mqtt(config)._tls_context()
        async with aiomqtt.Client(
            "localhost", tls_broker["port"], username="agent", password="pa$$word",
            tls_context=context,
        ) as pub:
            await pub.publish("wells/W-7", b'{"t": "2026-01-01T00:00:00Z", "p": 3}', qos=1)
            await wait_until(lambda: len(sink.readings) == 1)
    assert (sink.readings[0].well_id, sink.readings[0].value) == ("W-7", 3.0)
    # A wrong password is refused for good; a CA that did not sign the server is refused too.
    wrong = make_config(client_ids, **keys, password="wrong", tls=tls)
    with pytest.raises(CollectorError) as error:
        await Mqtt(wrong).probe()
    assert not error.value.retryable and "refused" in str(error.value)
    assert "wrong" not in str(error.value)
    untrusted = make_config(client_ids, **keys, password="pa$$word",
                            tls={**tls, "ca_file": tls_broker["cert_file"]})
    with pytest.raises(CollectorError, match="certificate"):
        await Mqtt(untrusted).probe()
    missing = make_config(client_ids, **keys, password="pa$$word",
                          tls={**tls, "ca_file": "/nonexistent/ca.pem"})
    with pytest.raises(CollectorError) as error:
        await Mqtt(missing).probe()
    assert not error.value.retryable and "TLS files" in str(error.value)


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({}, "at least one entry in topics or sparkplug"),
        ({"topics": [{"topic": "a/#/b", "well_id": "W", "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}]}, "'#' must be a whole level"),
        ({"topics": [{"topic": "a/b+", "well_id": "W", "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}]}, "'\\+' must be a whole level"),
        ({"topics": [{"topic": "a/+", "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}]}, "exactly one of well_id"),
        ({"topics": [{"topic": "a/+", "well_id": "W", "well_id_field": "w", "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}]}, "got well_id, well_id_field"),
        ({"topics": [{"topic": "a/+", "well_id_topic_level": 2, "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}]}, "not a level of 'a/\\+'"),
        ({"topics": [{"topic": "a/+", "well_id": "W", "values": []}]}, "at least 1"),
        ({"topics": [{"topic": "a", "well_id": "W", "timestamp_format": "epoch_ns",
                      "values": [{"field": "p", "parameter": "x", "unit": "u"}]}]},
         "timestamp_format"),
        ({"sparkplug": [{"group_id": "+", "well_id": "W", "metrics": [
            {"name": "m", "parameter": "x", "unit": "u"}]}]}, "must name one group"),
        ({"sparkplug": [{"group_id": "a/b", "well_id": "W", "metrics": [
            {"name": "m", "parameter": "x", "unit": "u"}]}]}, "one topic level"),
        ({"sparkplug": [{"group_id": "g", "metrics": [
            {"name": "m", "parameter": "x", "unit": "u"}]}]}, "a well_id for every metric"),
        ({"password": "p", "sparkplug": [{"group_id": "g", "well_id": "W", "metrics": [
            {"name": "m", "parameter": "x", "unit": "u"}]}]}, "password needs a username"),
        ({"tls": {"cert_file": "c.pem", "key_file": "k.pem"}, "topics": [
            {"topic": "a", "well_id": "W", "values": [
                {"field": "p", "parameter": "x", "unit": "u"}]}]}, "apply only with enabled"),
        ({"tls": {"enabled": True, "cert_file": "c.pem"}, "topics": [
            {"topic": "a", "well_id": "W", "values": [
                {"field": "p", "parameter": "x", "unit": "u"}]}]}, "together"),
        ({"keepalive": "1s", "topics": [{"topic": "a", "well_id": "W", "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}]}, "between 5s"),
        ({"topics": [{"topic": "a", "well_id": "W", "values": [
            {"field": "p", "parameter": "x", "unit": "u"}]}] * 2}, "appear twice: a"),
    ],
)
def test_bad_configs_fail_at_load(keys: dict[str, Any], problem: str) -> None:
    base = {"name": "b", "type": "mqtt", "host": "127.0.0.1", "client_id": "agent-1"}
    with pytest.raises(ValueError, match=problem):
        MqttConfig.model_validate({**base, **keys})


def test_the_sample_loads(tmp_path: Path) -> None:
    loaded = load_sample(tmp_path, "mqtt", environ={"MQTT_PASSWORD": "from-the-environment"})
    [source] = loaded.data_sources
    assert isinstance(source, MqttConfig)
    assert source.password is not None
    assert source.password.get_secret_value() == "from-the-environment"
    assert source.topics and source.sparkplug
    assert Mqtt(source).filters[-1].startswith("spBv1.0/")


def test_the_page_shows_the_sample() -> None:
    page = PAGE.read_text(encoding="utf-8")
    shown = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == sample_text("mqtt")
