"""Validation without a server: structure refuses the request, domain rules refuse points."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest_service.errors import InvalidRequest
from ingest_service.parameters import ParameterRegistry
from ingest_service.validation import Validator
from welltegra.ingest.v1 import ingest_pb2

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def dp(**changes: object) -> ingest_pb2.DataPoint:
    point = ingest_pb2.DataPoint(
        well_id="WELL_001", parameter_name="wellhead_pressure", value=100.0, unit="bar"
    )
    point.timestamp.FromDatetime(NOW - timedelta(seconds=1))
    for name, value in changes.items():
        if value is None:
            point.ClearField(name)
        else:
            setattr(point, name, value)
    return point


@pytest.fixture
def validator() -> Validator:
    return Validator(ParameterRegistry(), future_tolerance=timedelta(minutes=5))


def test_accepted_points_are_canonical(validator: Validator) -> None:
    result = validator.validate([dp(), dp(quality_code="BAD", source="PI")], now=NOW)
    assert not result.rejected
    first, second = result.accepted
    assert (first.unit, first.original_unit, first.original_value) == ("psi", "bar", 100.0)
    assert first.value == pytest.approx(1450.377377)
    assert first.quality_code == "GOOD" and second.quality_code == "BAD"


def test_nanoseconds_are_kept_to_the_microsecond(validator: Validator) -> None:
    point = dp()
    point.timestamp.nanos = 123_456_789
    assert validator.validate([point], now=NOW).accepted[0].timestamp.microsecond == 123_456


@pytest.mark.parametrize(
    ("point", "field", "problem"),
    [
        (dp(well_id=""), "data_points[0].well_id", "is required"),
        (dp(parameter_name=""), "data_points[0].parameter_name", "is required"),
        (dp(unit=""), "data_points[0].unit", "is required"),
        (dp(value=None), "data_points[0].value", "is required"),
        (dp(timestamp=None), "data_points[0].timestamp", "is required"),
        (dp(value=float("inf")), "data_points[0].value", "must be a finite number"),
        (dp(well_id="W" * 129), "data_points[0].well_id", "must be at most 128 characters"),
        (dp(source="S" * 257), "data_points[0].source", "must be at most 256 characters"),
        (dp(source="a\x00b"), "data_points[0].source", "must not contain NUL characters"),
        (
            dp(quality_code="good"),
            "data_points[0].quality_code",
            "must be one of GOOD, BAD, UNCERTAIN",
        ),
    ],
)
def test_structural_problems(
    validator: Validator, point: ingest_pb2.DataPoint, field: str, problem: str
) -> None:
    with pytest.raises(InvalidRequest) as error:
        validator.validate([point], now=NOW)
    assert [(v.field, v.description) for v in error.value.violations] == [(field, problem)]


def test_out_of_range_timestamps_are_structural(validator: Validator) -> None:
    point = dp()
    point.timestamp.seconds = 253402300800  # 10000-01-01
    with pytest.raises(InvalidRequest) as error:
        validator.validate([point], now=NOW)
    assert error.value.violations[0].field == "data_points[0].timestamp"


def test_violations_are_capped_but_name_the_first_ones(validator: Validator) -> None:
    with pytest.raises(InvalidRequest) as error:
        validator.validate([dp(well_id="", unit="")] * 1000, now=NOW)
    assert len(error.value.violations) == 100
    assert error.value.violations[0].field == "data_points[0].well_id"


def test_domain_rules_reject_single_points(validator: Validator) -> None:
    future = dp()
    future.timestamp.FromDatetime(NOW + timedelta(minutes=6))
    result = validator.validate(
        [dp(), dp(parameter_name="mud_weight"), dp(unit="degC"), dp(value=-1.0), future, dp()],
        now=NOW,
    )
    assert len(result.accepted) == 2
    assert [(q.index, q.field) for q in result.rejected] == [
        (1, "data_points[1].parameter_name"),
        (2, "data_points[2].unit"),
        (3, "data_points[3].value"),
        (4, "data_points[4].timestamp"),
    ]
    assert "use one of psi, bar, kPa, MPa" in result.rejected[1].reason
    assert result.rejected[2].value == -1.0 and result.rejected[2].unit == "bar"


def test_fast_check_agrees_with_detailed_violations() -> None:
    """``_well_formed`` (the hot path) and ``_point_violations`` (the error report) must agree,
    or a bad point could pass, or a good request could fail with no reason given."""
    import random

    from ingest_service.validation import _point_violations, _well_formed

    rng = random.Random(20251106)
    texts = ["", "W", "W" * 128, "W" * 129, "a\x00b", "S" * 257, "psi"]
    numbers = [0.0, -1.5, 1e308, float("nan"), float("inf"), float("-inf"), None]
    seconds = [0, -62135596800, -62135596801, 253402300799, 253402300800, None]
    for _ in range(3000):
        point = dp(
            well_id=rng.choice(texts),
            parameter_name=rng.choice(texts),
            unit=rng.choice(texts),
            source=rng.choice(texts),
            quality_code=rng.choice(["", "GOOD", "BAD", "UNCERTAIN", "meh"]),
            value=rng.choice(numbers),
        )
        chosen = rng.choice(seconds)
        if chosen is None:
            point.ClearField("timestamp")
        else:
            point.timestamp.seconds = chosen
            point.timestamp.nanos = rng.choice([0, 999_999_999, 1_000_000_000, -1])
        if rng.random() < 0.2:  # a known field with the wrong wire type, or a future field
            point.MergeFromString(rng.choice([b"\x22\x03abc", b"\x08\x01", b"\xa0\x06\x01"]))
        assert _well_formed(point) == (not _point_violations(0, point)), point


def test_points_older_than_the_horizon_are_refused() -> None:
    validator = Validator(ParameterRegistry(), timedelta(minutes=5), max_age=timedelta(days=30))
    old = dp()
    old.timestamp.FromDatetime(NOW - timedelta(days=31))
    result = validator.validate([old, dp()], now=NOW)
    assert len(result.accepted) == 1
    assert result.rejected[0].field == "data_points[0].timestamp"
    assert "older than the accepted 30 days" in result.rejected[0].reason


def test_only_a_batch_with_gaps_may_hold_no_points(validator: Validator) -> None:
    gap = ingest_pb2.DataGap(
        well_id="WELL_001", parameter_name="not_in_registry", point_count=3, reason="retention"
    )
    gap.first_timestamp.FromDatetime(NOW - timedelta(days=8))
    gap.last_timestamp.FromDatetime(NOW - timedelta(days=7))
    result = validator.validate([], now=NOW, gaps=[gap])
    assert (result.accepted, result.rejected) == ([], [])
    [record] = result.gaps
    assert (record.index, record.parameter_name, record.point_count) == (0, "not_in_registry", 3)
    assert record.last_timestamp == NOW - timedelta(days=7)
    for gaps, message in (
        (None, "must hold 1 to 1000 points, not 0"),  # IngestRealtime: no gaps in its message
        ([], "must hold 1 to 1000 points, not 0 unless the batch carries data_gaps"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            validator.validate([], now=NOW, gaps=gaps)
        assert [(v.field, v.description) for v in refused.value.violations] == [
            ("data_points", message)
        ]
