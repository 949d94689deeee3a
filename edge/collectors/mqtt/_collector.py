"""The running ``mqtt`` collector: one session with the broker, messages to readings.

The session is persistent (clean session off in MQTT 3.1.1, clean start off with a session
expiry in MQTT 5) under the configured, stable client id, and every subscription asks for QoS 1.
So while the agent is down the broker keeps the QoS 1 messages of its topics, and delivers them
when it connects again: that is the whole of the gap handling, as MQTT has no history to read.

A message is acknowledged to the broker (PUBACK) only after its readings are durable in the
buffer: a message read but not yet buffered when the agent stops or crashes is delivered again.
The messages that have arrived are taken together, up to ``MAX_MESSAGES_PER_EMIT``, emitted in
one call and then acknowledged, in the order received.

The watermark ``last_message:<topic filter>`` holds the time of the newest reading of each
subscription; it is only read back to say, at start, where the previous run stopped. The
watermarks ``sparkplug:<group>/<edge node>`` keep each Sparkplug node's births and sequence, so
data by alias that the broker kept while the agent was down can be read (see ``_sparkplug``).

Payloads that are not JSON, not valid Sparkplug B, or lack what the mapping needs are counted in
``stats`` by reason, skipped, and logged once per topic until that topic sends a good one.

Errors: ``CollectorError`` only; aiomqtt's and ssl's are translated here. A broker that cannot be
reached or drops the connection is retryable; refused credentials or a refused subscription
and unusable TLS files are not.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.collectors.base import CollectorError, ReadingSink
from edge.collectors.mqtt._config import MqttConfig
from edge.collectors.mqtt._json import JsonMapping, Mapped
from edge.collectors.mqtt._sparkplug import SparkplugMapped, SparkplugReader, rebirth_request
from edge.readings import Reading

__all__ = ["MAX_MESSAGES_PER_EMIT", "Mqtt", "MqttStats"]

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_EMIT = 1000
# MQTT 5: at most this many QoS 1 messages in flight to the agent (received, not yet
# acknowledged because not yet buffered). With MQTT 3.1.1 the broker's own limit applies.
RECEIVE_MAXIMUM = 1000
# Topics whose bad-payload episode is being tracked; past this the tracking starts afresh.
MAX_TRACKED_TOPICS = 10_000
WATERMARK_PREFIX = "last_message:"
# CONNACK codes that trying again will not fix (3.1.1 and 5).
_PERMANENT_CONNECT = {1, 2, 4, 5, 128, 129, 130, 132, 133, 134, 135, 138, 140}


@dataclass(slots=True)
class MqttStats:
    """What the collector has done since it started (for logs and tests)."""

    messages: int = 0
    acknowledged: int = 0
    readings: int = 0
    bad_payloads: int = 0
    # reason → count: problems of bad payloads, and things skipped on purpose.
    problems: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)
    rebirth_requests: int = 0
    unmatched: int = 0  # messages of a topic no subscription of this config matches


@dataclass(frozen=True, slots=True)
class _Route:
    """A subscription of this config: its filter and what reads its messages."""

    topic: str
    mapping: JsonMapping | SparkplugReader


class Mqtt:
    """The running collector: implements ``Collector``; see the module docstring."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self.stats = MqttStats()
        # Set once connected and subscribed (tests wait for it).
        self.subscribed = asyncio.Event()
        self._routes = [_Route(t.topic, JsonMapping(t)) for t in config.topics] + [
            _Route(g.topic, SparkplugReader(g)) for g in config.sparkplug
        ]
        self._failing: dict[str, int] = {}  # topic → bad payloads in the current episode

    @property
    def filters(self) -> list[str]:
        return [route.topic for route in self._routes]

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if not tls.enabled:
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(tls.ca_file) if tls.ca_file is not None else None
            )
            if tls.cert_file is not None and tls.key_file is not None:
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise CollectorError(f"TLS files cannot be used: {exc}", retryable=False) from exc
        return context

    def _client(self, identifier: str, *, persistent: bool) -> aiomqtt.Client:
        config = self.config
        v5 = config.protocol == "5"
        properties = None
        if v5 and persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = int(config.session_expiry.total_seconds())
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            config.host,
            config.broker_port,
            username=config.username,
            password=config.password.get_secret_value() if config.password else None,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else not persistent,
            clean_start=(not persistent) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=int(config.keepalive.total_seconds()),
            timeout=config.timeout.total_seconds(),
            tls_context=self._tls_context(),
        )
        if persistent:
            # aiomqtt does not expose paho's manual acknowledgement: a message is acknowledged
            # only once buffered (see the module docstring).
            client._client.manual_ack_set(True)
        return client

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.broker_port}"

    def _error(self, exc: Exception) -> CollectorError:
        """``exc`` from aiomqtt as a ``CollectorError``, permanent when retrying cannot help."""
        code = getattr(exc, "rc", None)
        value = code.value if isinstance(code, ReasonCode) else code
        if isinstance(exc, MqttConnectError) and value in _PERMANENT_CONNECT:
            return CollectorError(f"{self._where()}: the broker refused: {exc}", retryable=False)
        return CollectorError(f"{self._where()}: {exc}")

    async def _subscribe(self, client: aiomqtt.Client) -> list[int]:
        """Subscribe to every filter at QoS 1; the granted QoS of each. A refused one raises."""
        v5 = self.config.protocol == "5"
        timeout = self.config.timeout.total_seconds()
        if v5:
            # noLocal: the agent's own rebirth requests do not come back to it.
            options = [(topic, SubscribeOptions(qos=1, noLocal=True)) for topic in self.filters]
            granted = await client.subscribe(options, timeout=timeout)
        else:
            granted = await client.subscribe([(t, 1) for t in self.filters], timeout=timeout)
        codes = [int(g.value) if isinstance(g, ReasonCode) else int(g) for g in granted]
        refused = [topic for topic, code in zip(self.filters, codes, strict=False) if code >= 0x80]
        if refused:
            raise CollectorError(
                f"{self._where()}: the broker refused the subscription to {', '.join(refused)}",
                retryable=False,
            )
        return codes

    async def probe(self) -> str:
        """Connect with a separate, clean session (the agent's own stays untouched), subscribe
        to every filter, and disconnect."""
        config = self.config
        identifier = f"{config.client_id}-probe"
        try:
            async with self._client(identifier, persistent=False) as client:
                granted = await self._subscribe(client)
        except aiomqtt.MqttError as exc:
            raise self._error(exc) from exc
        tls = "TLS" if config.tls.enabled else "no TLS"
        low = [t for t, q in zip(self.filters, granted, strict=False) if q < 1]
        text = (
            f"{self._where()}: MQTT {config.protocol}, {tls}, {len(granted)} subscriptions "
            "granted"
        )
        return text + (f"; at QoS 0 only (no queueing while down): {', '.join(low)}" if low else "")

    async def run(self, sink: ReadingSink) -> None:
        """Read messages until cancelled; see the module docstring."""
        config = self.config
        for route in self._routes:
            last = await sink.watermark(WATERMARK_PREFIX + route.topic)
            if last is not None:
                log.info(
                    "mqtt %s: %s: the last reading before this start was at %s; the broker "
                    "delivers what it kept for the session since",
                    config.name, route.topic, last,
                )
        try:
            async with self._client(config.client_id, persistent=True) as client:
                granted = await self._subscribe(client)
                for topic, qos in zip(self.filters, granted, strict=False):
                    if qos < 1:
                        log.warning(
                            "mqtt %s: the broker granted QoS 0 for %s: its messages are not "
                            "kept while the agent is down", config.name, topic,
                        )
                log.info(
                    "mqtt %s: connected to %s as %s (MQTT %s), %d subscriptions",
                    config.name, self._where(), config.client_id, config.protocol,
                    len(granted),
                )
                self.subscribed.set()
                await self._read(client, sink)
        except aiomqtt.MqttError as exc:
            raise self._error(exc) from exc
        finally:
            self.subscribed.clear()

    async def _read(self, client: aiomqtt.Client, sink: ReadingSink) -> None:
        messages = client.messages
        while True:
            batch = [await anext(messages)]
            while len(messages) and len(batch) < MAX_MESSAGES_PER_EMIT:
                batch.append(await anext(messages))
            await self._restore_nodes(batch, sink)
            readings, watermarks, rebirths = self._process(batch, sink)
            if readings or watermarks:
                await sink.emit(readings, watermarks)
            for message in batch:
                if message.qos > 0:
                    client._client.ack(message.mid, message.qos)
                    self.stats.acknowledged += 1
            for group_id, node, reason in rebirths:
                topic, payload = rebirth_request(group_id, node, datetime.now(UTC))
                log.warning(
                    "mqtt %s: asking Sparkplug edge node %s/%s for a rebirth: %s",
                    self.config.name, group_id, node, reason,
                )
                await client.publish(topic, payload, qos=0)
                self.stats.rebirth_requests += 1

    async def _restore_nodes(self, batch: Sequence[aiomqtt.Message], sink: ReadingSink) -> None:
        """Take up the kept state of Sparkplug edge nodes first heard of in ``batch``."""
        for message in batch:
            for route in self._routes:
                reader = route.mapping
                if not isinstance(reader, SparkplugReader) or not message.topic.matches(
                    route.topic
                ):
                    continue
                node = reader.needs_state(message.topic.value)
                if node is None:
                    continue
                if not reader.restore(node, await sink.watermark(reader.state_key(node))):
                    log.warning(
                        "mqtt %s: the kept state of Sparkplug node %s/%s is unreadable; "
                        "waiting for its birth", self.config.name, reader.group.group_id, node,
                    )

    def _process(
        self, batch: Sequence[aiomqtt.Message], sink: ReadingSink
    ) -> tuple[list[Reading], dict[str, str], list[tuple[str, str, str]]]:
        """The readings of ``batch``, the watermarks they move, and the rebirths to request;
        the payloads' problems are counted on ``sink``."""
        readings: list[Reading] = []
        newest: dict[str, datetime] = {}
        rebirths: list[tuple[str, str, str]] = []
        stats = self.stats
        for message in batch:
            stats.messages += 1
            received = datetime.now(UTC)
            topic = message.topic.value
            route = next((r for r in self._routes if message.topic.matches(r.topic)), None)
            if route is None:
                # A subscription of the session that this config no longer has.
                stats.unmatched += 1
                continue
            payload = message.payload if isinstance(message.payload, bytes) else (
                str(message.payload).encode() if message.payload is not None else b""
            )
            mapped: Mapped = route.mapping.map(topic, payload, received, bool(message.retain))
            stats.ignored.update(mapped.ignored)
            if mapped.problems:
                stats.problems.update(mapped.problems)
                for reason, count in mapped.problems.items():
                    sink.reject(reason, count)
                stats.bad_payloads += 1
                self._bad(topic, mapped.detail)
            else:
                self._good(topic)
            if isinstance(mapped, SparkplugMapped) and mapped.rebirth is not None:
                assert isinstance(route.mapping, SparkplugReader)
                rebirths.append((route.mapping.group.group_id, topic.split("/")[3],
                                 mapped.rebirth))
            if mapped.readings:
                readings += mapped.readings
                latest = max(r.timestamp for r in mapped.readings)
                if route.topic not in newest or latest > newest[route.topic]:
                    newest[route.topic] = latest
        stats.readings += len(readings)
        watermarks = {WATERMARK_PREFIX + t: when.isoformat() for t, when in newest.items()}
        for route in self._routes:
            if isinstance(route.mapping, SparkplugReader):
                watermarks.update(route.mapping.snapshots())
        return readings, watermarks, rebirths

    def _bad(self, topic: str, detail: str) -> None:
        count = self._failing.get(topic)
        if count is None:
            if len(self._failing) >= MAX_TRACKED_TOPICS:
                self._failing.clear()
            log.warning(
                "mqtt %s: %s: bad payload, skipped: %s (said once until this topic sends a "
                "good one)", self.config.name, topic, detail,
            )
            count = 0
        self._failing[topic] = count + 1

    def _good(self, topic: str) -> None:
        count = self._failing.pop(topic, None)
        if count is not None:
            log.info(
                "mqtt %s: %s: good payloads again after %d bad ones",
                self.config.name, topic, count,
            )
