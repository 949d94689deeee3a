"""Sparkplug B payloads: the state of a group's edge nodes, and their metrics as readings.

Topics are ``spBv1.0/<group>/<message type>/<edge node>[/<device>]``. An NBIRTH (node) or DBIRTH
(device) names every metric with its alias and data type; NDATA and DDATA then carry values by
alias (or by name). Every message of a node but NDEATH carries ``seq``, one more than the last
(255 wraps to 0). When a number is skipped, or data comes from a node whose birth this agent has
not seen (after the agent started, or after a lost message), the agent asks the node to be born
again: an NCMD with ``Node Control/Rebirth`` = true, as a non-primary host application. That is
the only message the agent ever publishes, at most once per node every ``REBIRTH_HOLDOFF``
seconds until the node is reborn, and only when the group's ``request_rebirth`` is on.

What the births declared, and the last ``seq``, are kept per node in the buffer's watermarks
(``sparkplug:<group>/<node>``), written with the readings. After a restart they are trusted
only if the node's first message continues its sequence; otherwise they are dropped, data by
alias waits for the rebirth the agent then requests, and is counted as ``unknown_alias``.

Metric timestamps are used (else the payload's, else the time of receipt); historical metrics
are emitted like the others (the buffer does not care about recency); transient metrics are not
kept, as the specification asks of a historian. Quality comes from the metric's ``Quality``
property when it has one (OPC DA codes, as Ignition and Cirrus Link send: 192 good, 64-127
uncertain, below 64 bad), else GOOD.

The schema is Eclipse Tahu's ``sparkplug_b.proto`` (see ``_schema``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.message import DecodeError

from edge.collectors.mqtt._config import SPARKPLUG_NAMESPACE, SparkplugGroup, SparkplugMetric
from edge.collectors.mqtt._json import Mapped
from edge.collectors.mqtt._schema import payload_class
from edge.readings import Quality, Reading

__all__ = ["REBIRTH_HOLDOFF", "STATE_PREFIX", "SparkplugReader", "rebirth_request"]

# At most one rebirth request per edge node in this many seconds, until it is reborn.
REBIRTH_HOLDOFF = 10.0
REBIRTH_METRIC = "Node Control/Rebirth"
STATE_PREFIX = "sparkplug:"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Sparkplug data types (the schema's DataType enum) that matter here.
_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8, Int16, Int32, Int64
_BOOLEAN = 11
_DATETIME = 13
_NODE_TYPES = {"NBIRTH", "NDEATH", "NDATA"}
_DEVICE_TYPES = {"DBIRTH", "DDEATH", "DDATA"}
_COMMAND_TYPES = {"NCMD", "DCMD", "STATE"}


class _NotNumeric(ValueError):
    pass


@dataclass(slots=True)
class _Definitions:
    """The metrics one BIRTH declared: alias → (name, data type), name → data type."""

    by_alias: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    datatypes: dict[str, int | None] = field(default_factory=dict)


@dataclass(slots=True)
class _Node:
    """What is known of one edge node: its birth, its devices' births, its sequence."""

    born: bool = False
    seq: int | None = None
    bd_seq: int | None = None
    devices: dict[str | None, _Definitions] = field(default_factory=dict)  # None: the node
    rebirth_requested_at: float | None = None
    restored: bool = False  # taken from the watermark, not yet confirmed by a seq

    def snapshot(self) -> str:
        """The node's births and sequence as text, for its watermark."""
        devices = {
            device or "": {
                "aliases": {str(a): [n, t] for a, (n, t) in d.by_alias.items()},
                "datatypes": d.datatypes,
            }
            for device, d in self.devices.items()
        }
        return json.dumps(
            {"born": self.born, "seq": self.seq, "bd_seq": self.bd_seq, "devices": devices},
            separators=(",", ":"),
        )

    @classmethod
    def from_snapshot(cls, text: str) -> _Node:
        """The node as ``snapshot`` wrote it; ``ValueError`` (or ``KeyError``/``TypeError``)
        when the text is not such a snapshot."""
        data = json.loads(text)
        node = cls(born=bool(data["born"]), seq=data["seq"], bd_seq=data["bd_seq"],
                   restored=True)
        for device, d in data["devices"].items():
            node.devices[device or None] = _Definitions(
                by_alias={int(a): (str(n), t) for a, (n, t) in d["aliases"].items()},
                datatypes={str(n): t for n, t in d["datatypes"].items()},
            )
        return node


@dataclass(slots=True)
class SparkplugMapped(Mapped):
    """A Sparkplug message's readings and problems, and a rebirth to request, if any."""

    rebirth: str | None = None  # the reason to ask the node for a rebirth


def rebirth_request(group_id: str, edge_node: str, now: datetime) -> tuple[str, bytes]:
    """The topic and payload of an NCMD asking ``edge_node`` to publish its births again."""
    millis = (now - _EPOCH) // timedelta(milliseconds=1)
    payload = payload_class()(timestamp=millis)
    metric = payload.metrics.add()
    metric.name = REBIRTH_METRIC
    metric.timestamp = millis
    metric.datatype = _BOOLEAN
    metric.boolean_value = True
    topic = f"{SPARKPLUG_NAMESPACE}/{group_id}/NCMD/{edge_node}"
    return topic, bytes(payload.SerializeToString())


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _value(metric: Any, datatype: int | None) -> float | None:
    """The metric's value as a number, None when it is null; ``_NotNumeric`` otherwise."""
    kind = metric.WhichOneof("value")
    if metric.is_null or kind is None:
        return None
    if datatype == _DATETIME:
        raise _NotNumeric("a DateTime")
    if kind in ("int_value", "long_value"):
        raw = int(getattr(metric, kind))
        bits = _SIGNED_BITS.get(datatype or 0)
        # Signed types travel as two's complement in the unsigned fields.
        return float(_signed(raw, bits) if bits is not None else raw)
    if kind in ("float_value", "double_value"):
        return float(getattr(metric, kind))
    if kind == "boolean_value":
        return 1.0 if metric.boolean_value else 0.0
    raise _NotNumeric(kind.removesuffix("_value"))


def _quality(metric: Any) -> Quality:
    if not metric.HasField("properties"):
        return Quality.GOOD
    properties = metric.properties
    for key, value in zip(properties.keys, properties.values, strict=False):
        if key.lower() != "quality":
            continue
        kind = value.WhichOneof("value")
        if kind not in ("int_value", "long_value"):
            return Quality.GOOD
        code = int(getattr(value, kind)) & 0xFF
        if code >= 0xC0:
            return Quality.GOOD
        return Quality.UNCERTAIN if code >= 0x40 else Quality.BAD
    return Quality.GOOD


def _bd_seq(payload: Any) -> int | None:
    for metric in payload.metrics:
        if metric.name == "bdSeq" and metric.WhichOneof("value") in ("int_value", "long_value"):
            return int(getattr(metric, metric.WhichOneof("value")))
    return None


class SparkplugReader:
    """The edge nodes of one ``SparkplugGroup``, fed its messages in the order received."""

    def __init__(
        self, group: SparkplugGroup, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.group = group
        self._payload = payload_class()
        self.nodes: dict[str, _Node] = {}
        self._clock = clock
        self._metrics: dict[str, list[SparkplugMetric]] = {}
        for metric in group.metrics:
            self._metrics.setdefault(metric.name, []).append(metric)
        self.changed: set[str] = set()  # nodes whose state changed since ``snapshots``
        self._looked_up: set[str] = set()  # nodes whose watermark was read

    def state_key(self, node_id: str) -> str:
        return f"{STATE_PREFIX}{self.group.group_id}/{node_id}"

    def needs_state(self, topic: str) -> str | None:
        """The edge node of ``topic`` if its kept state has not been looked up yet."""
        levels = topic.split("/")
        if len(levels) < 4 or levels[3] in self.nodes or levels[3] in self._looked_up:
            return None
        return levels[3]

    def restore(self, node_id: str, text: str | None) -> bool:
        """Take up the state kept for ``node_id`` (None: nothing kept); False when the text
        is unusable (the node then starts unknown)."""
        self._looked_up.add(node_id)
        if text is None or node_id in self.nodes:
            return True
        try:
            self.nodes[node_id] = _Node.from_snapshot(text)
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        return True

    def snapshots(self) -> dict[str, str]:
        """The watermarks of the nodes whose state changed since the last call."""
        states = {
            self.state_key(node): self.nodes[node].snapshot()
            for node in self.changed
            if node in self.nodes
        }
        self.changed.clear()
        return states

    def map(
        self, topic: str, payload: bytes, received: datetime, retained: bool
    ) -> SparkplugMapped:
        result = SparkplugMapped()
        levels = topic.split("/")
        if len(levels) not in (4, 5) or levels[0] != SPARKPLUG_NAMESPACE:
            result.problem("bad_topic", "not a Sparkplug B topic")
            return result
        kind, node_id = levels[2], levels[3]
        device = levels[4] if len(levels) == 5 else None
        if kind in _COMMAND_TYPES:
            result.ignored["command"] += 1  # other hosts' commands, and our own requests
            return result
        if kind not in (_NODE_TYPES if device is None else _DEVICE_TYPES):
            result.problem("bad_topic", f"no Sparkplug message type {kind!r} at this level")
            return result
        try:
            message = self._payload.FromString(payload)
        except DecodeError as exc:
            result.problem("not_sparkplug", f"not a Sparkplug B payload: {exc}")
            return result
        self.changed.add(node_id)
        if kind == "NDEATH":
            self._death(node_id, message, result)
            return result
        node = self.nodes.get(node_id)
        if kind == "NBIRTH":
            node = self.nodes[node_id] = _Node(born=True, bd_seq=_bd_seq(message))
            node.devices[None] = _Definitions()
        elif node is None or not node.born:
            node = self.nodes.setdefault(node_id, _Node())
            result.ignored["before_birth"] += 1
            self._want_rebirth(node, "no birth of it seen since the agent started", result)
        if message.HasField("seq"):
            seq = int(message.seq)
            if node.born and kind != "NBIRTH" and node.seq is not None:
                expected = (node.seq + 1) % 256
                if seq != expected:
                    result.ignored["seq_gap"] += 1
                    if node.restored:
                        # Births kept from before a restart may be outdated after a gap.
                        node.born = False
                        node.devices.clear()
                        self._want_rebirth(
                            node, f"seq {seq} where {expected} was due after a restart", result
                        )
                    else:
                        self._want_rebirth(node, f"seq {seq} where {expected} was due", result)
            node.restored = False
            node.seq = seq
        else:
            result.problem("no_seq", f"{kind} without seq")
        if kind == "DDEATH":
            node.devices.pop(device, None)
            return result
        if kind in ("NBIRTH", "DBIRTH"):
            definitions = node.devices[device] = _Definitions()
            for metric in message.metrics:
                datatype = int(metric.datatype) if metric.HasField("datatype") else None
                if metric.name:
                    definitions.datatypes[metric.name] = datatype
                    if metric.HasField("alias"):
                        definitions.by_alias[int(metric.alias)] = (metric.name, datatype)
        self._readings(node_id, device, node.devices.get(device), message, received, retained,
                       result)
        return result

    def _death(self, node_id: str, message: Any, result: Mapped) -> None:
        node = self.nodes.get(node_id)
        bd_seq = _bd_seq(message)
        if node is None:
            return
        if node.bd_seq is not None and bd_seq is not None and bd_seq != node.bd_seq:
            # The will of an earlier session, delivered late: the node is alive.
            result.ignored["stale_death"] += 1
            return
        node.born = False
        node.devices.clear()
        node.seq = None

    def _want_rebirth(self, node: _Node, reason: str, result: SparkplugMapped) -> None:
        if not self.group.request_rebirth:
            return
        now = self._clock()
        if node.rebirth_requested_at is not None and (
            now - node.rebirth_requested_at < REBIRTH_HOLDOFF
        ):
            return
        node.rebirth_requested_at = now
        result.rebirth = reason

    def _readings(
        self,
        node_id: str,
        device: str | None,
        definitions: _Definitions | None,
        message: Any,
        received: datetime,
        retained: bool,
        result: Mapped,
    ) -> None:
        group = self.group
        payload_time = message.timestamp if message.HasField("timestamp") else None
        for metric in message.metrics:
            if metric.name:
                name = metric.name
                datatype = definitions.datatypes.get(name) if definitions else None
            elif metric.HasField("alias") and definitions is not None and (
                int(metric.alias) in definitions.by_alias
            ):
                name, datatype = definitions.by_alias[int(metric.alias)]
            else:
                result.ignored["unknown_alias"] += 1
                continue
            if metric.HasField("datatype"):
                datatype = int(metric.datatype)
            mapping = self._mapping(name, node_id, device)
            if mapping is None:
                result.ignored["unmapped_metric"] += 1
                continue
            if metric.is_transient:
                result.ignored["transient"] += 1
                continue
            millis = metric.timestamp if metric.HasField("timestamp") else payload_time
            if millis is None and retained:
                result.ignored["retained_without_timestamp"] += 1
                continue
            well = mapping.well_id or group.well_id
            if well is None:
                well = node_id if group.well_id_from == "edge_node" else device
            tag = "/".join(part for part in (node_id, device, name) if part)
            if well is None:
                result.problem("no_well_id", f"{tag}: a node metric has no device for a well id")
                continue
            try:
                value = _value(metric, datatype)
            except _NotNumeric as exc:
                result.problem("not_numeric", f"{tag}: {exc} is not a number")
                continue
            timestamp = received if millis is None else _EPOCH + timedelta(milliseconds=millis)
            quality = _quality(metric) if value is not None else Quality.BAD
            result.readings.append(
                Reading(well, mapping.parameter, timestamp, value, mapping.unit, quality, tag)
            )

    def _mapping(self, name: str, node_id: str, device: str | None) -> SparkplugMetric | None:
        for candidate in self._metrics.get(name, ()):
            if candidate.edge_node not in (None, node_id):
                continue
            if candidate.device not in (None, device):
                continue
            return candidate
        return None
