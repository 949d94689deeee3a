"""The simulator collector: deterministic, realistic, resumable from its watermark."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from edge.collectors.base import Collector
from edge.collectors.simulator import SIMULATED_PARAMETERS, Simulator, SimulatorConfig
from edge.readings import Quality, Reading
from ingest_service.parameters import ParameterRegistry

REGISTRY = ParameterRegistry()
# The realistic band of each parameter, in its default unit.
BANDS = {
    "wellhead_pressure": (1_500, 3_500),
    "hookload": (150, 450),
    "flow_rate": (800, 5_000),
    "downhole_temperature": (180, 260),
}
WELLS = ("WELL-001", "WELL-002", "WELL-003")


def config(**overrides: Any) -> SimulatorConfig:
    values: dict[str, Any] = {"name": "sim", "wells": WELLS, "rate": 10}
    values.update(overrides)
    return SimulatorConfig(**values)


def canonical(reading: Reading) -> float:
    parameter = REGISTRY.get(reading.parameter)
    assert parameter is not None and reading.value is not None
    return parameter.to_canonical(reading.value, reading.unit)


def in_registry_range(reading: Reading) -> bool:
    parameter = REGISTRY.get(reading.parameter)
    assert parameter is not None
    return parameter.in_range(canonical(reading))


# --- determinism and time ------------------------------------------------------------------


def test_same_config_gives_the_same_readings_in_any_order() -> None:
    first = list(Simulator(config()).readings_between(1_000, 1_200))
    other = Simulator(config())
    backwards = [r for tick in range(1_200, 999, -1) for r in reversed(other.readings_at(tick))]
    assert first == backwards[::-1]
    assert len(first) == 201 * len(WELLS) * 4


def test_seed_changes_the_values_but_not_the_shape() -> None:
    one = Simulator(config(seed=1)).readings_at(5_000)
    two = Simulator(config(seed=2)).readings_at(5_000)
    assert [(r.well_id, r.parameter, r.timestamp, r.unit) for r in one] == [
        (r.well_id, r.parameter, r.timestamp, r.unit) for r in two
    ]
    assert all(a.value != b.value for a, b in zip(one, two, strict=True))


def test_readings_at_names_every_series_in_order() -> None:
    sim = Simulator(config())
    readings = sim.readings_at(42)
    assert [(r.well_id, r.parameter) for r in readings] == [
        (well, parameter) for well in WELLS for parameter in SIMULATED_PARAMETERS
    ]
    assert {r.tag for r in readings} == {f"{r.well_id}.{r.parameter}" for r in readings}
    assert {r.timestamp for r in readings} == {sim.tick_time(42)}
    assert sim.series_count == len(readings) == 12


@pytest.mark.parametrize(
    ("rate", "tick", "micros"),
    [
        (10, 1, 100_000),
        (10, 17_000_000_123, 1_700_000_012_300_000),
        (1, -3, -3_000_000),
        (10_000, 3, 300),
        (0.5, 3, 6_000_000),
        (0.1, 7, 70_000_000),
        (3, 1, 333_333),  # 333,333.33 rounds down
        (3, 2, 666_667),  # 666,666.67 rounds up
        (8_000, 1, 125),
        (6_400, 1, 156),  # 156.25
        (6_400, 2, 313),  # 312.5 rounds half up
    ],
)
def test_tick_time_is_k_over_rate_rounded_to_the_microsecond(
    rate: float, tick: int, micros: int
) -> None:
    sim = Simulator(config(rate=rate))
    instant = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert sim.tick_time(tick) == instant
    assert sim.tick_of(instant) == tick
    assert sim.tick_of(instant + timedelta(microseconds=1)) == tick
    assert sim.tick_of(instant - timedelta(microseconds=1)) == tick - 1


def test_tick_of_takes_naive_times_as_utc_and_honours_offsets() -> None:
    sim = Simulator(config(rate=1))
    aware = datetime(2025, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    tick = int(aware.timestamp())  # 0.5 s past the tick
    assert sim.tick_of(aware) == tick
    assert sim.tick_of(aware.replace(tzinfo=None)) == tick
    assert sim.tick_of(aware.astimezone(timezone(timedelta(hours=9)))) == tick


# --- values --------------------------------------------------------------------------------


def test_good_values_stay_in_their_realistic_band_and_drift() -> None:
    # Two days at one reading a minute per tag, 34,560 readings: drift, not only noise.
    sim = Simulator(config(rate=1 / 60, seed=7, out_of_range_ratio=0, bad_quality_ratio=0))
    readings = list(sim.readings_between(0, 2 * 24 * 60))
    by_series: dict[str, list[float]] = {}
    for reading in readings:
        assert reading.quality is Quality.GOOD
        assert reading.unit == SIMULATED_PARAMETERS[reading.parameter]
        low, high = BANDS[reading.parameter]
        assert reading.value is not None
        assert low <= reading.value <= high, reading
        by_series.setdefault(reading.tag, []).append(reading.value)
    for tag, values in by_series.items():
        low, high = BANDS[tag.split(".", 1)[1]]
        # The level wanders over a good part of the band...
        assert max(values) - min(values) > 0.2 * (high - low), tag
        # ...slowly: a minute apart, values are close.
        steps = [abs(b - a) for a, b in itertools.pairwise(values)]
        assert max(steps) < 0.1 * (high - low), tag


def test_bad_and_out_of_range_ratios_hold_over_many_readings() -> None:
    sim = Simulator(config(seed=3, bad_quality_ratio=0.05, out_of_range_ratio=0.02))
    readings = list(sim.readings_between(0, 100_000 // 12))
    total = len(readings)
    bad = [r for r in readings if r.quality is Quality.BAD]
    outside = [r for r in readings if not in_registry_range(r)]
    # Expected 5 % and 2 %; the bounds are ±7 standard deviations.
    assert abs(len(bad) - 0.05 * total) < 500
    assert abs(len(outside) - 0.02 * total) < 300
    assert all(r.value is not None for r in bad)
    # BAD values are ordinary values; anything inside the registry's range is realistic.
    for reading in readings:
        if in_registry_range(reading):
            low, high = BANDS[reading.parameter]
            assert low <= canonical(reading) <= high, reading
    # Out-of-range values are clearly outside, on both sides, for every parameter.
    for parameter, spec in ((p, REGISTRY.get(p)) for p in SIMULATED_PARAMETERS):
        assert spec is not None
        values = [canonical(r) for r in outside if r.parameter == parameter]
        assert any(v < spec.min - 5 for v in values) and any(v > spec.max + 5 for v in values)
        assert all(v < spec.min - 5 or v > spec.max + 5 for v in values)


@pytest.mark.parametrize(("bad", "outside"), [(0.0, 0.0), (1.0, 1.0)])
def test_ratios_of_zero_and_one_are_exact(bad: float, outside: float) -> None:
    sim = Simulator(config(bad_quality_ratio=bad, out_of_range_ratio=outside))
    readings = list(sim.readings_between(0, 1_000))
    assert sum(r.quality is Quality.BAD for r in readings) == bad * len(readings)
    assert sum(not in_registry_range(r) for r in readings) == outside * len(readings)


def test_units_from_config_are_produced_in_that_unit() -> None:
    units = {"downhole_temperature": "degC", "wellhead_pressure": "bar", "flow_rate": "m3/day"}
    converted = Simulator(config(units=units)).readings_between(0, 500)
    default = Simulator(config()).readings_between(0, 500)
    for reading, reference in zip(converted, default, strict=True):
        assert reading.unit == units.get(reading.parameter, reference.unit)
        assert reading.quality == reference.quality
        assert canonical(reading) == pytest.approx(reference.value, rel=1e-9)
        if reading.parameter == "downhole_temperature":
            assert reference.value is not None and reading.value is not None
            assert reading.value == pytest.approx((reference.value - 32) * 5 / 9, rel=1e-9)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parameters": ["casing_pressure"]}, "cannot simulate 'casing_pressure'"),
        ({"parameters": ["hookload", "hookload"]}, "parameters must be unique"),
        ({"wells": ["W-1", "W-1"]}, "well names must be unique"),
        ({"units": {"wellhead_pressure": "degC"}}, "cannot be converted to 'psi'"),
        ({"units": {"hookload": "furlongs_per_fortnight_x"}}, "unknown unit"),
        (
            {"parameters": ["hookload"], "units": {"flow_rate": "m3/day"}},
            "'flow_rate' is not one of the simulated parameters",
        ),
    ],
)
def test_bad_config_is_refused_at_load(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**overrides)


async def test_build_and_probe() -> None:
    collector: Collector = config(rate=2.5).build()
    assert isinstance(collector, Simulator)
    assert await collector.probe() == "simulating 3 wells × 4 parameters at 2.5 Hz"


# --- run -----------------------------------------------------------------------------------


class MemorySink:
    """A ``ReadingSink`` that keeps everything in memory; ``emit`` is durable at once."""

    def __init__(self, watermarks: dict[str, str] | None = None) -> None:
        self.readings: list[Reading] = []
        self.watermarks: dict[str, str] = dict(watermarks or {})
        self.emits: list[tuple[int, str]] = []  # (readings, watermark) per call

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        self.readings.extend(readings)
        self.watermarks.update(watermarks or {})
        self.emits.append((len(readings), (watermarks or {}).get("tick", "")))

    async def watermark(self, key: str) -> str | None:
        return self.watermarks.get(key)

    def reject(self, reason: str, count: int = 1) -> None:
        raise AssertionError(f"{count} records rejected ({reason})")


async def run_for(sim: Simulator, sink: MemorySink, seconds: float) -> None:
    task = asyncio.create_task(sim.run(sink))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def ticks_of(sim: Simulator, readings: Sequence[Reading]) -> list[int]:
    """The ticks of ``readings``, checking each tick is complete and exactly as simulated."""
    n = sim.series_count
    assert len(readings) % n == 0
    ticks = [sim.tick_of(readings[i].timestamp) for i in range(0, len(readings), n)]
    for index, tick in enumerate(ticks):
        assert list(readings[index * n : index * n + n]) == sim.readings_at(tick)
    return ticks


async def test_run_emits_contiguous_ticks_from_now_and_resumes_without_gap_or_duplicate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    sim = Simulator(config(rate=1_000))
    sink = MemorySink()
    before = sim.tick_of(datetime.now(UTC))
    await run_for(sim, sink, 0.5)
    after = sim.tick_of(datetime.now(UTC))
    ticks = ticks_of(sim, sink.readings)
    assert before <= ticks[0] <= before + 50  # starts at the current tick
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    assert ticks[-1] > ticks[0] + 200 and ticks[-1] <= after
    assert sink.watermarks == {"tick": str(ticks[-1])}
    # Chunks: at most ~5,000 readings, each with the watermark of its own last tick, and a
    # handful of wake-ups rather than one per tick.
    assert all(count <= 5_000 for count, _ in sink.emits)
    emitted = 0
    for count, watermark in sink.emits:
        emitted += count
        assert watermark == str(ticks[emitted // sim.series_count - 1])
    assert len(sink.emits) < 40

    first_run = len(sink.readings)
    await asyncio.sleep(0.1)  # a short outage: the restart replays it
    await run_for(Simulator(config(rate=1_000)), sink, 0.3)
    resumed = ticks_of(sim, sink.readings[first_run:])
    assert resumed[0] == ticks[-1] + 1
    all_ticks = ticks + resumed
    assert all_ticks == list(range(ticks[0], resumed[-1] + 1))
    assert sink.watermarks == {"tick": str(resumed[-1])}
    assert not caplog.records


async def test_watermark_older_than_the_backfill_limit_skips_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge.collectors.simulator")
    sim = Simulator(config(rate=100, backfill_limit="2s"))
    start = datetime.now(UTC)
    watermark = sim.tick_of(start - timedelta(hours=1))
    sink = MemorySink({"tick": str(watermark)})
    await run_for(sim, sink, 0.3)
    ticks = ticks_of(sim, sink.readings)
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    # Resumed two seconds back (the limit), not an hour back, and not at now.
    first_time = sim.tick_time(ticks[0])
    assert start - timedelta(seconds=2) <= first_time <= start - timedelta(seconds=1.5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    skipped_ticks = ticks[0] - (watermark + 1)
    message = warnings[0].getMessage()
    assert f"skipping {skipped_ticks} ticks ({skipped_ticks * 12} readings)" in message
    assert 3_580 * 100 < skipped_ticks < 3_600 * 100


async def test_watermark_within_the_backfill_limit_replays_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    sim = Simulator(config(rate=1_000, backfill_limit="1h"))
    watermark = sim.tick_of(datetime.now(UTC) - timedelta(seconds=5))
    sink = MemorySink({"tick": str(watermark)})
    await run_for(sim, sink, 0.5)
    ticks = ticks_of(sim, sink.readings)
    assert ticks[0] == watermark + 1
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    assert ticks[-1] >= watermark + 5_000  # the 5 s caught up
    assert all(count <= 5_000 for count, _ in sink.emits)
    assert not caplog.records
