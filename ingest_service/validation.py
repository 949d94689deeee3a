"""Stage 4 of the pipeline: is the request well formed, and which of its points may be stored.

Two kinds of problem, two answers:

* Structural (a required field missing, a value that is not a finite number, a time outside
  RFC 3339's range, 0 or more than 1,000 points, text the database cannot hold, a data gap that
  is malformed): the request is wrong as a whole and nothing of it is stored. ``InvalidRequest``
  carries one field violation per problem, with paths like ``data_points[3].value`` or
  ``data_gaps[2].point_count``.
* Domain (unknown parameter, a unit not accepted for the parameter, a value outside its range,
  a time too far in the future): only that point is refused. The rest is stored, and the refused
  point is kept in the tenant's quarantine with its reason.

Accepted points leave this stage converted to their parameter's canonical unit. Data gaps (an
agent's records of points it lost, sent with ``Ingest`` batches) have structural rules only: a
loss record is kept whatever parameter it names, so that no loss goes unrecorded. A batch that
carries gaps may hold no points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, NoReturn

from google.protobuf import unknown_fields
from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.errors import FieldViolation, InvalidRequest
from ingest_service.parameters import ParameterRegistry
from welltegra.ingest.v1 import ingest_pb2

__all__ = [
    "GAP_REASONS",
    "MAX_GAPS",
    "MAX_POINTS",
    "QUALITY_CODES",
    "GapRecord",
    "QuarantinedPoint",
    "StoredPoint",
    "ValidatedBatch",
    "Validator",
]

MAX_POINTS = 1000
MAX_GAPS = 1000
QUALITY_CODES = frozenset({"GOOD", "BAD", "UNCERTAIN"})
# Why an agent lost points. Extensible: a new reason is added here (and documented), not in the
# contract, which carries it as a string.
GAP_REASONS = frozenset({"size_cap", "retention", "dead_letter"})
MAX_TEXT = {"well_id": 128, "parameter_name": 64, "unit": 32, "source": 256}
MAX_GAP_TEXT = {name: MAX_TEXT[name] for name in ("well_id", "parameter_name", "source")}
MAX_VIOLATIONS = 100  # enough to fix a request; a 1,000-point mistake needs no 1,000 lines

_FIELD_NAMES = {field.number: field.name for field in ingest_pb2.DataPoint.DESCRIPTOR.fields}
_GAP_FIELD_NAMES = {field.number: field.name for field in ingest_pb2.DataGap.DESCRIPTOR.fields}
_TIMESTAMP_MIN = -62135596800  # 0001-01-01T00:00:00Z
_TIMESTAMP_MAX = 253402300799  # 9999-12-31T23:59:59Z


class StoredPoint(NamedTuple):
    """An accepted point, its value in the parameter's canonical unit; also what the
    operator's query reads back, decrypted. A tuple: cheap to build for every point."""

    well_id: str
    parameter_name: str
    timestamp: datetime
    value: float
    unit: str
    quality_code: str
    source: str
    original_value: float
    original_unit: str


@dataclass(frozen=True, slots=True)
class QuarantinedPoint:
    """A refused point as it was sent, with the field at fault and the reason."""

    index: int
    well_id: str
    parameter_name: str
    timestamp: datetime
    value: float
    unit: str
    quality_code: str
    source: str
    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class GapRecord:
    """A well-formed data gap of a batch, ``index`` its position in the batch's data_gaps."""

    index: int
    well_id: str
    parameter_name: str
    first_timestamp: datetime
    last_timestamp: datetime
    point_count: int
    reason: str
    source: str


@dataclass(frozen=True, slots=True)
class ValidatedBatch:
    """The outcome of validating one batch: what to store and what was refused."""

    accepted: list[StoredPoint]
    rejected: list[QuarantinedPoint]
    gaps: tuple[GapRecord, ...] = ()


# Timestamps become datetimes as EPOCH + delta; Postgres keeps microseconds, so finer
# nanoseconds are truncated, as the database would.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Validator:
    """Checks batches against the structural rules and the parameter registry."""

    def __init__(
        self,
        registry: ParameterRegistry,
        future_tolerance: timedelta,
        max_age: timedelta = timedelta(days=3650),
    ) -> None:
        self._registry = registry
        self._future_tolerance = future_tolerance
        self._max_age = max_age

    def validate(
        self,
        points: Sequence[ingest_pb2.DataPoint],
        now: datetime | None = None,
        gaps: Sequence[ingest_pb2.DataGap] | None = None,
    ) -> ValidatedBatch:
        """Raise ``InvalidRequest`` for structural errors, else split ``points``.

        ``gaps`` are the data gaps of an ``Ingest`` batch (None for a request that cannot carry
        any); a batch with at least one may hold no points.

        This is the gateway's hottest loop, so it makes one pass with cheap checks; only when a
        point fails one does ``_point_violations`` work out the detailed field violations.
        """
        _check_counts(len(points), gaps)
        gap_violations = _gap_violations(gaps or ())
        now = now or datetime.now(UTC)
        latest_allowed = now + self._future_tolerance
        oldest_allowed = now - self._max_age
        lookup = self._registry.get
        accepted: list[StoredPoint] = []
        rejected: list[QuarantinedPoint] = []
        for index, point in enumerate(points):
            if not _well_formed(point):
                _raise_structure_errors(points, gap_violations)
            ts = point.timestamp
            timestamp = _EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)
            parameter = lookup(point.parameter_name)
            conversion = parameter.conversions.get(point.unit) if parameter else None
            canonical = conversion.apply(point.value) if conversion else math.nan
            if (
                parameter is None
                or conversion is None
                or not parameter.in_range(canonical)
                or not oldest_allowed <= timestamp <= latest_allowed
            ):
                field, reason = self._refusal(index, point, canonical, timestamp, now)
                rejected.append(
                    QuarantinedPoint(
                        index=index,
                        well_id=point.well_id,
                        parameter_name=point.parameter_name,
                        timestamp=timestamp,
                        value=point.value,
                        unit=point.unit,
                        quality_code=point.quality_code or "GOOD",
                        source=point.source,
                        field=field,
                        reason=reason,
                    )
                )
                continue
            accepted.append(
                StoredPoint(
                    point.well_id,
                    point.parameter_name,
                    timestamp,
                    canonical,
                    parameter.canonical_unit,
                    point.quality_code or "GOOD",
                    point.source,
                    point.value,
                    point.unit,
                )
            )
        if gap_violations:
            raise InvalidRequest("Invalid data schema", gap_violations[:MAX_VIOLATIONS])
        return ValidatedBatch(
            accepted=accepted,
            rejected=rejected,
            gaps=tuple(_gap_record(i, g) for i, g in enumerate(gaps or ())),
        )

    def _refusal(
        self,
        index: int,
        point: ingest_pb2.DataPoint,
        canonical: float,
        timestamp: datetime,
        now: datetime,
    ) -> tuple[str, str]:
        """The field at fault and the reason, for a point that broke a domain rule."""
        path = f"data_points[{index}]"
        parameter = self._registry.get(point.parameter_name)
        if parameter is None:
            return (
                f"{path}.parameter_name",
                f"unknown parameter {point.parameter_name!r}; known parameters: "
                + ", ".join(self._registry.names()),
            )
        if point.unit not in parameter.conversions:
            return (
                f"{path}.unit",
                f"unit {point.unit!r} is not accepted for {parameter.name}; use one of "
                + ", ".join(parameter.conversions),
            )
        if not parameter.in_range(canonical):
            return (
                f"{path}.value",
                f"{canonical:g} {parameter.canonical_unit} is outside the valid range "
                f"{parameter.min:g}..{parameter.max:g} {parameter.canonical_unit} "
                f"of {parameter.name}",
            )
        if timestamp > now:
            return (
                f"{path}.timestamp",
                f"{timestamp.isoformat()} is more than "
                f"{self._future_tolerance.total_seconds():g}s in the future",
            )
        return (
            f"{path}.timestamp",
            f"{timestamp.isoformat()} is older than the accepted {self._max_age.days} days",
        )


def _well_formed(point: ingest_pb2.DataPoint) -> bool:
    """The structural rules as cheap checks; must agree with ``_point_violations``."""
    ts = point.timestamp
    return (
        0 < len(point.well_id) <= MAX_TEXT["well_id"]
        and 0 < len(point.parameter_name) <= MAX_TEXT["parameter_name"]
        and 0 < len(point.unit) <= MAX_TEXT["unit"]
        and len(point.source) <= MAX_TEXT["source"]
        and "\x00" not in point.well_id + point.parameter_name + point.unit + point.source
        and point.HasField("value")
        and math.isfinite(point.value)
        and point.HasField("timestamp")
        and _TIMESTAMP_MIN <= ts.seconds <= _TIMESTAMP_MAX
        and 0 <= ts.nanos < 1_000_000_000
        and (not point.quality_code or point.quality_code in QUALITY_CODES)
        and not _mistyped_fields(point)
    )


def _mistyped_fields(
    message: ingest_pb2.DataPoint | ingest_pb2.DataGap, names: dict[int, str] = _FIELD_NAMES
) -> set[str]:
    """Known fields sent with the wrong wire type (a string where the double belongs). They do
    not fail parsing: protobuf keeps them as unknown fields. Fields this version does not know
    at all are ignored, as protobuf intends, so newer senders stay compatible."""
    unknown = unknown_fields.UnknownFieldSet(message)
    if not len(unknown):
        return set()
    return {
        names[unknown[i].field_number]
        for i in range(len(unknown))
        if unknown[i].field_number in names
    }


def _raise_structure_errors(
    points: Sequence[ingest_pb2.DataPoint], gap_violations: list[FieldViolation]
) -> NoReturn:
    violations: list[FieldViolation] = []
    for index, point in enumerate(points):
        violations.extend(_point_violations(index, point))
        if len(violations) >= MAX_VIOLATIONS:
            break
    violations.extend(gap_violations)
    raise InvalidRequest("Invalid data schema", violations[:MAX_VIOLATIONS])


def _check_counts(points: int, gaps: Sequence[ingest_pb2.DataGap] | None) -> None:
    """1 to MAX_POINTS points, or none in a batch that carries 1 to MAX_GAPS gaps."""
    gap_count = 0 if gaps is None else len(gaps)
    violations = []
    if points > MAX_POINTS or (points == 0 and gap_count == 0):
        unless = " unless the batch carries data_gaps" if gaps is not None and not points else ""
        violations.append(
            FieldViolation(
                "data_points", f"must hold 1 to {MAX_POINTS} points, not {points}{unless}"
            )
        )
    if gap_count > MAX_GAPS:
        violations.append(
            FieldViolation("data_gaps", f"must hold at most {MAX_GAPS} gaps, not {gap_count}")
        )
    if violations:
        raise InvalidRequest("Invalid data schema", violations)


def _valid_time(ts: Timestamp) -> bool:
    return _TIMESTAMP_MIN <= ts.seconds <= _TIMESTAMP_MAX and 0 <= ts.nanos < 1_000_000_000


def _gap_violations(gaps: Sequence[ingest_pb2.DataGap]) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    for index, gap in enumerate(gaps):
        found.extend(_one_gap_violations(index, gap))
        if len(found) >= MAX_VIOLATIONS:
            break
    return found


def _one_gap_violations(index: int, gap: ingest_pb2.DataGap) -> list[FieldViolation]:
    path = f"data_gaps[{index}]"
    found: list[FieldViolation] = []
    wrong_type = _mistyped_fields(gap, _GAP_FIELD_NAMES)
    for name in sorted(wrong_type):
        expected = "a whole number" if name == "point_count" else f"of the type of {name}"
        found.append(FieldViolation(f"{path}.{name}", f"must be {expected}"))
    for name, limit in MAX_GAP_TEXT.items():
        text: str = getattr(gap, name)
        if name != "source" and not text and name not in wrong_type:
            found.append(FieldViolation(f"{path}.{name}", "is required"))
        elif len(text) > limit:
            found.append(FieldViolation(f"{path}.{name}", f"must be at most {limit} characters"))
        elif "\x00" in text:
            found.append(FieldViolation(f"{path}.{name}", "must not contain NUL characters"))
    times_valid = True
    for name in ("first_timestamp", "last_timestamp"):
        if name in wrong_type:
            times_valid = False
        elif not gap.HasField(name):
            found.append(FieldViolation(f"{path}.{name}", "is required"))
            times_valid = False
        elif not _valid_time(getattr(gap, name)):
            found.append(
                FieldViolation(f"{path}.{name}", "must be a valid RFC 3339 time (years 1-9999)")
            )
            times_valid = False
    first, last = gap.first_timestamp, gap.last_timestamp
    if times_valid and (first.seconds, first.nanos) > (last.seconds, last.nanos):
        found.append(FieldViolation(f"{path}.last_timestamp", "must not be before first_timestamp"))
    if "point_count" not in wrong_type and gap.point_count < 1:
        found.append(FieldViolation(f"{path}.point_count", "must be 1 or more"))
    if "reason" not in wrong_type:
        if not gap.reason:
            found.append(FieldViolation(f"{path}.reason", "is required"))
        elif gap.reason not in GAP_REASONS:
            found.append(
                FieldViolation(f"{path}.reason", f"must be one of {', '.join(sorted(GAP_REASONS))}")
            )
    return found


def _gap_record(index: int, gap: ingest_pb2.DataGap) -> GapRecord:
    first, last = gap.first_timestamp, gap.last_timestamp
    return GapRecord(
        index=index,
        well_id=gap.well_id,
        parameter_name=gap.parameter_name,
        first_timestamp=_EPOCH + timedelta(0, first.seconds, first.nanos // 1000),
        last_timestamp=_EPOCH + timedelta(0, last.seconds, last.nanos // 1000),
        point_count=gap.point_count,
        reason=gap.reason,
        source=gap.source,
    )


def _point_violations(index: int, point: ingest_pb2.DataPoint) -> list[FieldViolation]:
    path = f"data_points[{index}]"
    found: list[FieldViolation] = []
    # A mistyped field is named as such instead of being reported "missing".
    wrong_type = _mistyped_fields(point)
    for name in sorted(wrong_type):
        expected = "a number" if name == "value" else f"of the type of {name}"
        found.append(FieldViolation(f"{path}.{name}", f"must be {expected}"))
    for name, limit in MAX_TEXT.items():
        text: str = getattr(point, name)
        if name != "source" and not text and name not in wrong_type:
            found.append(FieldViolation(f"{path}.{name}", "is required"))
        elif len(text) > limit:
            found.append(FieldViolation(f"{path}.{name}", f"must be at most {limit} characters"))
        elif "\x00" in text:
            found.append(FieldViolation(f"{path}.{name}", "must not contain NUL characters"))
    if "value" not in wrong_type:
        if not point.HasField("value"):
            found.append(FieldViolation(f"{path}.value", "is required"))
        elif not math.isfinite(point.value):
            found.append(FieldViolation(f"{path}.value", "must be a finite number"))
    if "timestamp" not in wrong_type:
        if not point.HasField("timestamp"):
            found.append(FieldViolation(f"{path}.timestamp", "is required"))
        elif not _valid_time(point.timestamp):
            found.append(
                FieldViolation(f"{path}.timestamp", "must be a valid RFC 3339 time (years 1-9999)")
            )
    if point.quality_code and point.quality_code not in QUALITY_CODES:
        found.append(FieldViolation(f"{path}.quality_code", "must be one of GOOD, BAD, UNCERTAIN"))
    return found
