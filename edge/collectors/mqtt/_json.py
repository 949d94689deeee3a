"""JSON payloads: a message is an object (or a list of objects) whose fields are points.

Per subscription, the well comes from a constant, a topic level or a payload field; the time
from a payload field (ISO 8601, or seconds or milliseconds since the Unix epoch) or else the
instant the agent received the message; each mapped field is one point.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from edge.collectors.mqtt._config import JsonTopic
from edge.readings import Quality, Reading

__all__ = ["JsonMapping", "Mapped", "parse_timestamp"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MISSING = object()
_QUALITIES = {"good": Quality.GOOD, "bad": Quality.BAD, "uncertain": Quality.UNCERTAIN}


@dataclass(slots=True)
class Mapped:
    """What one message gave: its readings, and what was wrong with it."""

    readings: list[Reading] = field(default_factory=list)
    # reason → count; a message with any problem is a bad payload for the log.
    problems: Counter[str] = field(default_factory=Counter)
    detail: str = ""  # the first problem, in words, for the log
    # reason → count of things skipped on purpose (not a fault of the payload).
    ignored: Counter[str] = field(default_factory=Counter)

    def problem(self, reason: str, detail: str) -> None:
        self.problems[reason] += 1
        if not self.detail:
            self.detail = detail


def parse_timestamp(value: Any, fmt: str) -> datetime:
    """``value`` as an aware UTC instant in ``fmt``; ``ValueError`` when it is not one.

    ISO 8601 text without an offset is taken as UTC. Epoch numbers may be given as text."""
    if fmt == "iso8601":
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not ISO 8601 text")
        instant = datetime.fromisoformat(value.strip())
        if instant.tzinfo is None:
            return instant.replace(tzinfo=UTC)
        return instant.astimezone(UTC)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    try:
        if fmt == "epoch_ms":
            return _EPOCH + timedelta(milliseconds=number)
        return _EPOCH + timedelta(seconds=number)
    except OverflowError as exc:
        raise ValueError(f"{value!r} is out of range") from exc


def _lookup(record: Any, path: str) -> Any:
    """The value at dotted ``path`` (``a.b.0.c``) in ``record``, or ``_MISSING``."""
    node = record
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _number(value: Any) -> float | None:
    """``value`` as a float, None for JSON null; ``ValueError`` when it is not a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return float(value.strip())
    raise ValueError("not a number")


class JsonMapping:
    """Turns the messages of one JSON subscription into readings."""

    def __init__(self, subscription: JsonTopic) -> None:
        self.subscription = subscription

    def map(self, topic: str, payload: bytes, received: datetime, retained: bool) -> Mapped:
        result = Mapped()
        sub = self.subscription
        if retained and sub.timestamp_field is None:
            # A retained message is an old value: without its own time it cannot be placed.
            result.ignored["retained_without_timestamp"] += 1
            return result
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            result.problem("not_json", f"not JSON: {exc}")
            return result
        records = document if isinstance(document, list) else [document]
        for index, record in enumerate(records):
            where = f"element {index}: " if isinstance(document, list) else ""
            if not isinstance(record, dict):
                result.problem("not_an_object", f"{where}not a JSON object")
                continue
            self._record(topic, record, received, where, result)
        return result

    def _record(
        self, topic: str, record: dict[str, Any], received: datetime, where: str, result: Mapped
    ) -> None:
        sub = self.subscription
        well = self._well(topic, record)
        if well is None:
            result.problem("no_well_id", f"{where}no well id ({self._well_source()})")
            return
        timestamp = received
        if sub.timestamp_field is not None:
            raw = _lookup(record, sub.timestamp_field)
            if raw is _MISSING:
                result.problem("bad_timestamp", f"{where}no field {sub.timestamp_field!r}")
                return
            try:
                timestamp = parse_timestamp(raw, sub.timestamp_format)
            except (ValueError, OverflowError) as exc:
                result.problem(
                    "bad_timestamp",
                    f"{where}{sub.timestamp_field}: not {sub.timestamp_format}: {exc}",
                )
                return
        quality = Quality.GOOD
        if sub.quality_field is not None:
            raw = _lookup(record, sub.quality_field)
            if raw is not _MISSING:
                quality = _QUALITIES.get(str(raw).strip().lower(), Quality.UNCERTAIN)
        for value in sub.values:
            raw = _lookup(record, value.field)
            if raw is _MISSING:
                result.problem("missing_field", f"{where}no field {value.field!r}")
                continue
            try:
                number = _number(raw)
            except (ValueError, OverflowError):
                result.problem("not_numeric", f"{where}{value.field}: {raw!r} is not a number")
                continue
            result.readings.append(
                Reading(
                    well, value.parameter, timestamp, number, value.unit,
                    quality if number is not None else Quality.BAD,
                    f"{topic}:{value.field}",
                )
            )

    def _well(self, topic: str, record: dict[str, Any]) -> str | None:
        sub = self.subscription
        if sub.well_id is not None:
            return sub.well_id
        if sub.well_id_topic_level is not None:
            levels = topic.split("/")
            level = sub.well_id_topic_level
            return levels[level] or None if level < len(levels) else None
        assert sub.well_id_field is not None
        raw = _lookup(record, sub.well_id_field)
        if isinstance(raw, str) and raw:
            return raw
        if isinstance(raw, int) and not isinstance(raw, bool):
            return str(raw)
        return None

    def _well_source(self) -> str:
        sub = self.subscription
        if sub.well_id_topic_level is not None:
            return f"topic level {sub.well_id_topic_level}"
        return f"field {sub.well_id_field!r}"
