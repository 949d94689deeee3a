"""Stage 2 of the agent's pipeline: readings become points, the contract's data points.

A reading of a known parameter in an accepted unit is converted to the parameter's canonical
unit (the registry's affine pint conversion) and flagged when outside the parameter's range; it
is still sent, and the gateway quarantines it. A reading of an unknown parameter or unit is sent
as it is and counted as unmapped: the gateway, whose registry may be newer, decides.

A reading the gateway would refuse structurally is not sent, because one such point makes the
gateway refuse its whole batch. It is counted under one of these reasons:

* ``no_value``: the source gave no value;
* ``not_finite``: NaN or infinite (also when the conversion overflows);
* ``too_long``: well id, parameter name or unit longer than the gateway stores;
* ``invalid_text``: well id, parameter name or unit empty or holding a NUL character;
* ``bad_timestamp``: an instant outside RFC 3339's years 1 to 9999 in UTC.

Timestamps: an aware datetime is converted exactly (microseconds kept); a naive one is taken as
UTC; readings in a row that share one datetime object (a CSV row's columns) are converted once.
The ``source`` of a point is ``"<source>:<tag>"`` (or ``<source>`` for a reading without a
tag), cut to the gateway's limit, NUL characters removed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge.readings import Point, Reading
from ingest_service.parameters import ParameterRegistry
from ingest_service.validation import MAX_TEXT

__all__ = ["Transform", "TransformResult"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_TIMESTAMP_MIN = -62135596800  # 0001-01-01T00:00:00Z
_TIMESTAMP_MAX = 253402300799  # 9999-12-31T23:59:59Z
# Routes are cached per (well, parameter, unit, tag); a source with endless new tags must not
# grow the cache for ever, so it is emptied when it reaches this size.
_ROUTE_CACHE_LIMIT = 65_536


@dataclass(slots=True)
class TransformResult:
    """The points of one ``apply`` and what happened to the readings that are not among them."""

    points: list[Point]
    # reason → count, for readings that cannot be sent (see the module docstring).
    skipped: Counter[str] = field(default_factory=Counter)
    # Points sent but outside the registry's range (the gateway quarantines them).
    out_of_range: int = 0
    # Points of an unknown parameter or unit: sent unconverted, the gateway decides.
    unmapped: int = 0


@dataclass(frozen=True, slots=True)
class _Route:
    """What to do with the readings of one (well, parameter, unit, tag), worked out once."""

    refusal: str | None  # the skip reason every such reading gets, else None
    unit: str  # the unit sent: canonical when mapped, as read otherwise
    mapped: bool
    scale: float
    offset: float
    low: float
    high: float
    source: str


class Transform:
    """Turns the readings of one source into data points; see the module docstring."""

    def __init__(self, registry: ParameterRegistry, source: str) -> None:
        self._registry = registry
        self._source = source
        self._routes: dict[tuple[str, str, str, str], _Route] = {}

    def _route(self, well_id: str, parameter: str, unit: str, tag: str) -> _Route:
        source = f"{self._source}:{tag}" if tag else self._source
        source = source.replace("\x00", "")[: MAX_TEXT["source"]]
        refusal = None
        texts = ((well_id, "well_id"), (parameter, "parameter_name"), (unit, "unit"))
        if any(not text or "\x00" in text for text, _ in texts):
            refusal = "invalid_text"
        elif any(len(text) > MAX_TEXT[name] for text, name in texts):
            refusal = "too_long"
        known = self._registry.get(parameter)
        conversion = known.conversions.get(unit) if known is not None else None
        if known is None or conversion is None:
            return _Route(refusal, unit, False, 1.0, 0.0, -math.inf, math.inf, source)
        return _Route(
            refusal,
            known.canonical_unit,
            True,
            conversion.scale,
            conversion.offset,
            known.min,
            known.max,
            source,
        )

    def apply(self, readings: Sequence[Reading]) -> TransformResult:
        """Convert ``readings``; the hot path of the agent, one cached route per series."""
        result = TransformResult(points=[])
        points = result.points
        skipped = result.skipped
        routes = self._routes
        isfinite = math.isfinite
        out_of_range = unmapped = 0
        last_timestamp: datetime | None = None
        seconds = nanos = 0
        for reading in readings:
            value = reading.value
            if value is None:
                skipped["no_value"] += 1
                continue
            key = (reading.well_id, reading.parameter, reading.unit, reading.tag)
            route = routes.get(key)
            if route is None:
                if len(routes) >= _ROUTE_CACHE_LIMIT:
                    routes.clear()
                route = routes[key] = self._route(*key)
            if route.refusal is not None:
                skipped[route.refusal] += 1
                continue
            value = value * route.scale + route.offset
            if not isfinite(value):
                skipped["not_finite"] += 1
                continue
            timestamp = reading.timestamp
            if timestamp is not last_timestamp:
                last_timestamp = timestamp
                delta = timestamp - (_EPOCH if timestamp.tzinfo is not None else _EPOCH_NAIVE)
                seconds = delta.days * 86_400 + delta.seconds
                nanos = delta.microseconds * 1000
            if not _TIMESTAMP_MIN <= seconds <= _TIMESTAMP_MAX:
                skipped["bad_timestamp"] += 1
                continue
            if not route.mapped:
                unmapped += 1
            elif not route.low <= value <= route.high:
                out_of_range += 1
            points.append(
                Point(
                    reading.well_id,
                    reading.parameter,
                    seconds,
                    nanos,
                    value,
                    route.unit,
                    reading.quality,
                    route.source,
                )
            )
        result.out_of_range = out_of_range
        result.unmapped = unmapped
        return result
