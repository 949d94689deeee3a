"""Stage 4 of the pipeline: is the request well formed, and which of its points may be stored.

Two kinds of problem, two answers:

* Structural (a required field missing, a value that is not a finite number, a time outside
  RFC 3339's range, 0 or more than 1,000 points, text the database cannot hold): the request is
  wrong as a whole and nothing of it is stored. ``InvalidRequest`` carries one field violation
  per problem, with paths like ``data_points[3].value``.
* Domain (unknown parameter, a unit not accepted for the parameter, a value outside its range,
  a time too far in the future): only that point is refused. The rest is stored, and the refused
  point is kept in the tenant's quarantine with its reason.

Accepted points leave this stage converted to their parameter's canonical unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import unknown_fields
from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.errors import FieldViolation, InvalidRequest
from ingest_service.parameters import ParameterRegistry
from welltegra.ingest.v1 import ingest_pb2

__all__ = [
    "MAX_POINTS",
    "QUALITY_CODES",
    "QuarantinedPoint",
    "StoredPoint",
    "ValidatedBatch",
    "Validator",
]

MAX_POINTS = 1000
QUALITY_CODES = frozenset({"GOOD", "BAD", "UNCERTAIN"})
MAX_TEXT = {"well_id": 128, "parameter_name": 64, "unit": 32, "source": 256}
MAX_VIOLATIONS = 100  # enough to fix a request; a 1,000-point mistake needs no 1,000 lines

_FIELD_NAMES = {field.number: field.name for field in ingest_pb2.DataPoint.DESCRIPTOR.fields}
_TIMESTAMP_MIN = -62135596800  # 0001-01-01T00:00:00Z
_TIMESTAMP_MAX = 253402300799  # 9999-12-31T23:59:59Z


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """An accepted point, its value in the parameter's canonical unit."""

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
class ValidatedBatch:
    """The outcome of validating one batch: what to store and what was refused."""

    accepted: list[StoredPoint]
    rejected: list[QuarantinedPoint]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp_to_datetime(ts: Timestamp) -> datetime:
    # Postgres keeps microseconds; finer nanoseconds are truncated, as the database would.
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


class Validator:
    """Checks batches against the structural rules and the parameter registry."""

    def __init__(self, registry: ParameterRegistry, future_tolerance: timedelta) -> None:
        self._registry = registry
        self._future_tolerance = future_tolerance

    def validate(
        self,
        points: Sequence[ingest_pb2.DataPoint],
        now: datetime | None = None,
    ) -> ValidatedBatch:
        """Raise ``InvalidRequest`` for structural errors, else split ``points``."""
        self._check_structure(points)
        latest_allowed = (now or datetime.now(UTC)) + self._future_tolerance
        accepted: list[StoredPoint] = []
        rejected: list[QuarantinedPoint] = []
        for index, point in enumerate(points):
            timestamp = _timestamp_to_datetime(point.timestamp)
            quality = point.quality_code or "GOOD"
            refusal = self._domain_refusal(index, point, timestamp, latest_allowed)
            if refusal is not None:
                field, reason = refusal
                rejected.append(
                    QuarantinedPoint(
                        index=index,
                        well_id=point.well_id,
                        parameter_name=point.parameter_name,
                        timestamp=timestamp,
                        value=point.value,
                        unit=point.unit,
                        quality_code=quality,
                        source=point.source,
                        field=field,
                        reason=reason,
                    )
                )
                continue
            parameter = self._registry.get(point.parameter_name)
            assert parameter is not None  # _domain_refusal checked it
            accepted.append(
                StoredPoint(
                    well_id=point.well_id,
                    parameter_name=point.parameter_name,
                    timestamp=timestamp,
                    value=parameter.to_canonical(point.value, point.unit),
                    unit=parameter.canonical_unit,
                    quality_code=quality,
                    source=point.source,
                    original_value=point.value,
                    original_unit=point.unit,
                )
            )
        return ValidatedBatch(accepted=accepted, rejected=rejected)

    def _domain_refusal(
        self,
        index: int,
        point: ingest_pb2.DataPoint,
        timestamp: datetime,
        latest_allowed: datetime,
    ) -> tuple[str, str] | None:
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
        canonical = parameter.to_canonical(point.value, point.unit)
        if not parameter.in_range(canonical):
            return (
                f"{path}.value",
                f"{canonical:g} {parameter.canonical_unit} is outside the valid range "
                f"{parameter.min:g}..{parameter.max:g} {parameter.canonical_unit} "
                f"of {parameter.name}",
            )
        if timestamp > latest_allowed:
            return (
                f"{path}.timestamp",
                f"{timestamp.isoformat()} is more than "
                f"{self._future_tolerance.total_seconds():g}s in the future",
            )
        return None

    @staticmethod
    def _check_structure(points: Sequence[ingest_pb2.DataPoint]) -> None:
        if not 1 <= len(points) <= MAX_POINTS:
            raise InvalidRequest(
                "Invalid data schema",
                [
                    FieldViolation(
                        "data_points", f"must hold 1 to {MAX_POINTS} points, not {len(points)}"
                    )
                ],
            )
        violations: list[FieldViolation] = []
        for index, point in enumerate(points):
            violations.extend(_point_violations(index, point))
            if len(violations) >= MAX_VIOLATIONS:
                break
        if violations:
            raise InvalidRequest("Invalid data schema", violations[:MAX_VIOLATIONS])


def _point_violations(index: int, point: ingest_pb2.DataPoint) -> list[FieldViolation]:
    path = f"data_points[{index}]"
    found: list[FieldViolation] = []
    # A field sent with the wrong wire type (a string where the double belongs) does not fail
    # parsing: protobuf keeps it as an unknown field. Name it instead of reporting "missing".
    unknown = unknown_fields.UnknownFieldSet(point)
    wrong_type = {
        _FIELD_NAMES[unknown[i].field_number]
        for i in range(len(unknown))
        if unknown[i].field_number in _FIELD_NAMES
    }
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
        elif point.value != point.value or point.value in (float("inf"), float("-inf")):
            found.append(FieldViolation(f"{path}.value", "must be a finite number"))
    if "timestamp" not in wrong_type:
        if not point.HasField("timestamp"):
            found.append(FieldViolation(f"{path}.timestamp", "is required"))
        elif not (
            _TIMESTAMP_MIN <= point.timestamp.seconds <= _TIMESTAMP_MAX
            and 0 <= point.timestamp.nanos < 1_000_000_000
        ):
            found.append(
                FieldViolation(f"{path}.timestamp", "must be a valid RFC 3339 time (years 1-9999)")
            )
    if point.quality_code and point.quality_code not in QUALITY_CODES:
        found.append(FieldViolation(f"{path}.quality_code", "must be one of GOOD, BAD, UNCERTAIN"))
    return found
