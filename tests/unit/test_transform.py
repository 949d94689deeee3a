"""The transform stage: readings become data points the gateway accepts, or are counted."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from edge import transform as transform_module
from edge.collectors.simulator import Simulator, SimulatorConfig
from edge.readings import Point, Quality, Reading, add_points
from edge.transform import Transform
from ingest_service.parameters import ParameterRegistry
from ingest_service.validation import MAX_POINTS, MAX_TEXT, Validator
from welltegra.ingest.v1 import ingest_pb2

T0 = datetime(2025, 6, 1, 12, 30, 15, 123_456, tzinfo=UTC)


def reading(
    parameter: str = "wellhead_pressure",
    value: float | None = 2_000.0,
    unit: str = "psi",
    *,
    well_id: str = "WELL-001",
    timestamp: datetime = T0,
    quality: Quality = Quality.GOOD,
    tag: str = "",
) -> Reading:
    return Reading(well_id, parameter, timestamp, value, unit, quality, tag)


def as_messages(points: list[Point]) -> list[ingest_pb2.DataPoint]:
    """The points as the buffer writes them into a batch."""
    request = ingest_pb2.IngestRequest()
    add_points(request.data_points, points)
    return list(request.data_points)


@pytest.fixture(scope="module")
def registry() -> ParameterRegistry:
    return ParameterRegistry()


@pytest.fixture
def transform(registry: ParameterRegistry) -> Transform:
    return Transform(registry, "demo")


@pytest.mark.parametrize(
    ("parameter", "value", "unit", "expected", "canonical_unit"),
    [
        ("downhole_temperature", 100.0, "degC", 212.0, "degF"),
        ("downhole_temperature", -40.0, "degC", -40.0, "degF"),
        ("wellhead_pressure", 1.0, "bar", 14.503773773, "psi"),
        ("wellhead_pressure", 150.0, "bar", 2_175.566066, "psi"),
        ("flow_rate", 1.0, "m3/day", 6.28981077, "bbl/day"),
        ("flow_rate", 500.0, "m3/day", 3_144.905385, "bbl/day"),
        ("hookload", 150_000.0, "lbs", 150.0, "klbs"),
        ("wellhead_pressure", 2_345.678, "psi", 2_345.678, "psi"),
    ],
)
def test_known_units_are_converted_to_the_canonical_unit(
    transform: Transform,
    parameter: str,
    value: float,
    unit: str,
    expected: float,
    canonical_unit: str,
) -> None:
    result = transform.apply([reading(parameter, value, unit)])
    (point,) = result.points
    assert point.parameter_name == parameter
    assert point.unit == canonical_unit
    assert point.value == pytest.approx(expected, rel=1e-9)
    assert (result.out_of_range, result.unmapped, sum(result.skipped.values())) == (0, 0, 0)


def test_out_of_range_points_are_counted_and_still_sent(transform: Transform) -> None:
    readings = [
        reading(value=-5.0),
        reading(value=20_000.0),
        reading("downhole_temperature", 300.0, "degC"),  # 572 degF, above 500
        reading(value=0.0),  # the bounds are in range
        reading(value=15_000.0),
        reading("downhole_temperature", 260.0, "degC"),  # 500 degF
    ]
    result = transform.apply(readings)
    assert len(result.points) == 6
    assert result.out_of_range == 3
    assert [p.value for p in result.points[:2]] == [-5.0, 20_000.0]
    assert result.points[2].value == pytest.approx(572.0)


def test_unknown_parameters_and_units_are_sent_as_they_are(transform: Transform) -> None:
    readings = [
        reading("casing_pressure", 1_234.5, "bar"),
        reading("wellhead_pressure", 99_999.0, "atm_x"),  # not accepted: no range check either
        reading("wellhead_pressure", 1_000.0, "psi"),
    ]
    result = transform.apply(readings)
    assert [(p.parameter_name, p.value, p.unit) for p in result.points] == [
        ("casing_pressure", 1_234.5, "bar"),
        ("wellhead_pressure", 99_999.0, "atm_x"),
        ("wellhead_pressure", 1_000.0, "psi"),
    ]
    assert result.unmapped == 2
    assert result.out_of_range == 0


def test_readings_that_cannot_be_sent_are_skipped_with_their_reason(
    transform: Transform,
) -> None:
    readings = [
        reading(value=None),
        reading(value=None, quality=Quality.BAD),
        reading(value=math.nan),
        reading(value=math.inf),
        reading("casing_pressure", -math.inf, "bar"),  # unmapped is checked too
        reading(value=1e308, unit="MPa"),  # finite, but infinite once converted
        reading(well_id="W" * (MAX_TEXT["well_id"] + 1)),
        reading("p" * (MAX_TEXT["parameter_name"] + 1)),
        reading(unit="u" * (MAX_TEXT["unit"] + 1)),
        reading(well_id=""),
        reading(unit=""),
        reading(well_id="WELL\x00-1"),
        reading(timestamp=datetime(1, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=5)))),
        reading(value=1.0),
    ]
    result = transform.apply(readings)
    assert dict(result.skipped) == {
        "no_value": 2,
        "not_finite": 4,
        "too_long": 3,
        "invalid_text": 3,
        "bad_timestamp": 1,
    }
    assert [p.value for p in result.points] == [1.0]


def test_strings_at_the_limit_are_sent(transform: Transform) -> None:
    long_well = "W" * MAX_TEXT["well_id"]
    long_parameter = "p" * MAX_TEXT["parameter_name"]
    long_unit = "u" * MAX_TEXT["unit"]
    result = transform.apply([reading(long_parameter, 1.0, long_unit, well_id=long_well)])
    (point,) = result.points
    assert (point.well_id, point.parameter_name, point.unit) == (
        long_well,
        long_parameter,
        long_unit,
    )
    assert not result.skipped


@pytest.mark.parametrize(
    ("timestamp", "seconds", "nanos"),
    [
        (T0, 1_748_781_015, 123_456_000),
        (T0.astimezone(timezone(timedelta(hours=-5, minutes=-30))), 1_748_781_015, 123_456_000),
        (T0.replace(tzinfo=None), 1_748_781_015, 123_456_000),  # naive is UTC
        (datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC), -1, 500_000_000),
        (datetime(1, 1, 1, tzinfo=UTC), -62_135_596_800, 0),
        (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), 253_402_300_799, 999_999_000),
    ],
)
def test_timestamps_keep_every_microsecond(
    transform: Transform, timestamp: datetime, seconds: int, nanos: int
) -> None:
    (point,) = as_messages(transform.apply([reading(timestamp=timestamp)]).points)
    assert (point.timestamp.seconds, point.timestamp.nanos) == (seconds, nanos)
    expected = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    assert point.timestamp.ToDatetime(tzinfo=UTC) == expected


def test_source_names_the_tag_and_fits_the_gateway(registry: ParameterRegistry) -> None:
    transform = Transform(registry, "scada")
    readings = [
        reading(tag="ns=2;s=WH.PT-101"),
        reading(),
        reading(tag="x" * 300),
        reading(tag="a\x00b"),
    ]
    sources = [p.source for p in transform.apply(readings).points]
    assert sources[:2] == ["scada:ns=2;s=WH.PT-101", "scada"]
    assert sources[2] == ("scada:" + "x" * 300)[: MAX_TEXT["source"]]
    assert len(sources[2]) == MAX_TEXT["source"]
    assert sources[3] == "scada:ab"


def test_point_fields_and_quality(transform: Transform) -> None:
    result = transform.apply(
        [reading(quality=Quality.BAD, tag="t"), reading(quality=Quality.UNCERTAIN)]
    )
    first, second = as_messages(result.points)
    assert first.well_id == "WELL-001"
    assert first.HasField("value") and first.value == 2_000.0
    assert [first.quality_code, second.quality_code] == ["BAD", "UNCERTAIN"]
    assert type(first.quality_code) is str


def test_the_route_cache_is_bounded_and_stays_correct(
    transform: Transform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transform_module, "_ROUTE_CACHE_LIMIT", 2)
    readings = [
        reading(value=1.0, unit="bar", tag="a"),
        reading(value=1.0, unit="psi", tag="b"),
        reading("casing_pressure", 1.0, "bar", tag="c"),
        reading(value=1.0, unit="bar", tag="a"),
    ] * 3
    result = transform.apply(readings)
    assert [p.unit for p in result.points] == ["psi", "psi", "bar", "psi"] * 3
    assert [p.source for p in result.points[:4]] == ["demo:a", "demo:b", "demo:c", "demo:a"]
    assert result.unmapped == 3
    assert len(transform._routes) <= 2


def test_simulated_points_pass_the_gateway_validation(registry: ParameterRegistry) -> None:
    # The agent's output is what the gateway accepts as well formed; its range verdicts agree.
    sim = Simulator(
        SimulatorConfig(
            name="sim",
            wells=("W-1", "W-2"),
            rate=10,
            units={"downhole_temperature": "degC", "wellhead_pressure": "bar"},
            bad_quality_ratio=0.05,
            out_of_range_ratio=0.05,
        )
    )
    now = datetime.now(UTC)
    last = sim.tick_of(now)
    readings = list(sim.readings_between(last - 2_999, last))
    result = Transform(registry, "sim").apply(readings)
    assert len(result.points) == len(readings) == 24_000
    assert 0 < result.out_of_range < len(readings) * 0.1
    validator = Validator(registry, future_tolerance=timedelta(minutes=5))
    rejected = 0
    messages = as_messages(result.points)
    for start in range(0, len(messages), MAX_POINTS):
        batch = validator.validate(messages[start : start + MAX_POINTS], now=now)
        rejected += len(batch.rejected)
        for stored in batch.accepted:
            assert stored.value == stored.original_value  # already canonical
    assert rejected == result.out_of_range
