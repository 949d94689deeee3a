"""The ``simulator`` collector: realistic well data for tests, demos and benchmarks.

Every reading is a pure function of (seed, well, parameter, tick): the same configuration
produces the same points on every machine run and every restart, so tests can work out exactly
which points must exist. Tick ``k`` is the instant ``k / rate`` seconds after the Unix epoch
(UTC), rounded to the microsecond (half up); at rates that divide 1,000,000 (1, 2, 4, 5, 10,
100, 1000, 10000 Hz, ...) no rounding happens at all.

A value is a per-series level, a slow drift (two sinusoids, periods of hours and tens of
minutes) and bounded noise, all drawn from a BLAKE2b hash of the series and the tick. Now and
then a reading is marked BAD (value kept) or replaced by an impossible value (a negative
pressure, a temperature above the registry's maximum), at the configured ratios.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from hashlib import blake2b
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.collectors.base import Collector, ReadingSink, SourceConfig
from edge.readings import Quality, Reading
from ingest_service.config import Duration
from ingest_service.parameters import Conversion, ParameterRegistry, ParameterSpec, RegistryError

__all__ = ["SIMULATED_PARAMETERS", "Simulator", "SimulatorConfig"]

log = logging.getLogger(__name__)

# parameter → default unit the simulated tag reports in.
SIMULATED_PARAMETERS = {
    "wellhead_pressure": "psi",
    "hookload": "klbs",
    "flow_rate": "bbl/day",
    "downhole_temperature": "degF",
}

WATERMARK_KEY = "tick"
# At most this many readings per emit; a chunk holds whole ticks, so a tick of more series
# than this is emitted alone.
CHUNK_READINGS = 5_000
# The loop sleeps at least this long between wake-ups: at high rates one wake-up emits many
# ticks instead of waking 10,000 times a second.
MIN_SLEEP = 0.05


def _unit_conversion(parameter: str, unit: str) -> Conversion:
    """The conversion of ``parameter``'s default unit into ``unit``; ``RegistryError`` when
    pint cannot convert between them (or does not know ``unit``)."""
    default = SIMULATED_PARAMETERS[parameter]
    if unit == default:
        return Conversion(scale=1.0, offset=0.0)
    spec = ParameterSpec(name=parameter, canonical_unit=default, units=(unit,), min=0, max=0)
    loaded = ParameterRegistry([spec]).get(parameter)
    assert loaded is not None
    to_default = loaded.conversions[unit]
    # default = value * scale + offset, so value = (default - offset) / scale.
    return Conversion(scale=1 / to_default.scale, offset=-to_default.offset / to_default.scale)


class SimulatorConfig(SourceConfig):
    """Simulated wells: each well has one tag per parameter, read ``rate`` times a second."""

    type: Literal["simulator"] = "simulator"
    wells: tuple[str, ...] = Field(default=("WELL-001",), min_length=1)
    parameters: tuple[str, ...] = Field(default=tuple(SIMULATED_PARAMETERS), min_length=1)
    # Per parameter, the unit the simulated tag reports in (e.g. degC), converted by the agent.
    units: dict[str, str] = Field(default_factory=dict)
    rate: float = Field(default=1.0, gt=0, le=10_000, description="Readings per second per tag.")
    seed: int = 0
    bad_quality_ratio: float = Field(default=0.001, ge=0, le=1)
    out_of_range_ratio: float = Field(default=0.0005, ge=0, le=1)
    # After a restart the simulator replays from its watermark, as a historian would, at most
    # this far back; older readings are "missed" (and not claimed to be loss by the agent).
    backfill_limit: Duration = timedelta(hours=1)

    @field_validator("wells")
    @classmethod
    def _check_wells(cls, wells: tuple[str, ...]) -> tuple[str, ...]:
        if any(not well for well in wells):
            raise ValueError("well names must not be empty")
        if len(set(wells)) != len(wells):
            raise ValueError("well names must be unique")
        return wells

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, parameters: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in parameters if name not in SIMULATED_PARAMETERS]
        if unknown:
            raise ValueError(
                f"cannot simulate {', '.join(map(repr, unknown))}; "
                f"use {', '.join(SIMULATED_PARAMETERS)}"
            )
        if len(set(parameters)) != len(parameters):
            raise ValueError("parameters must be unique")
        return parameters

    @model_validator(mode="after")
    def _check_units(self) -> SimulatorConfig:
        for parameter, unit in self.units.items():
            if parameter not in self.parameters:
                raise ValueError(f"units: {parameter!r} is not one of the simulated parameters")
            try:
                _unit_conversion(parameter, unit)
            except RegistryError as exc:
                raise ValueError(f"units.{parameter}: {exc}") from exc
        return self

    def build(self) -> Collector:
        return Simulator(self)


@dataclass(frozen=True, slots=True)
class _Profile:
    """How one parameter behaves, in its default unit."""

    low: float  # realistic band: GOOD in-range values stay inside [low, high]
    high: float
    noise: float  # standard deviation; the noise is bounded at ±3 of it
    # Clearly impossible values, outside the default registry's range, below and above it.
    impossible_low: tuple[float, float]
    impossible_high: tuple[float, float]


_PROFILES = {
    "wellhead_pressure": _Profile(1_500, 3_500, 10.0, (-500, -50), (16_000, 20_000)),
    "hookload": _Profile(150, 450, 1.5, (-80, -10), (1_100, 1_500)),
    "flow_rate": _Profile(800, 5_000, 25.0, (-1_000, -100), (55_000, 80_000)),
    "downhole_temperature": _Profile(180, 260, 0.3, (-120, -70), (520, 700)),
}
assert _PROFILES.keys() == SIMULATED_PARAMETERS.keys()

# Drift: two sinusoids with these base periods (varied ±20 % per series) and amplitudes (share
# of the band). The level sits within 40-60 % of the band, so level ± drift ± noise stays in it.
_SLOW_PERIOD = 6 * 3600.0
_FAST_PERIOD = 40 * 60.0
_SLOW_AMPLITUDE = 0.2
_FAST_AMPLITUDE = 0.1

_BITS21 = (1 << 21) - 1
_BITS26 = (1 << 26) - 1
_BITS11 = (1 << 11) - 1
_BITS64 = (1 << 64) - 1
_NOISE_CENTRE = 1.5 * (1 << 21)  # the mean of three 21-bit uniforms
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class _Series:
    """One simulated tag, with everything that does not depend on the tick worked out."""

    well: str
    parameter: str
    tag: str
    unit: str
    hasher: blake2b  # fed (seed, well, parameter); a copy is fed the tick
    level: float
    slow_amplitude: float
    slow_omega: float
    slow_phase: float
    fast_amplitude: float
    fast_omega: float
    fast_phase: float
    noise_scale: float
    impossible: tuple[tuple[float, float], tuple[float, float]]
    scale: float  # default unit → reported unit
    offset: float


def _unit_fractions(data: bytes, count: int) -> list[float]:
    """``count`` fractions in [0, 1) drawn from ``data``'s hash (series constants)."""
    digest = blake2b(data, digest_size=8 * count).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") / 2.0**64 for i in range(count)]


def _series(config: SimulatorConfig, well: str, parameter: str) -> _Series:
    prefix = f"{config.seed}\x00{well}\x00{parameter}\x00".encode()
    profile = _PROFILES[parameter]
    level_f, slow_f, fast_f, slow_p, fast_p = _unit_fractions(prefix + b"constants", 5)
    span = profile.high - profile.low
    unit = config.units.get(parameter, SIMULATED_PARAMETERS[parameter])
    conversion = _unit_conversion(parameter, unit)
    return _Series(
        well=well,
        parameter=parameter,
        tag=f"{well}.{parameter}",
        unit=unit,
        hasher=blake2b(prefix, digest_size=16),
        level=profile.low + span * (0.4 + 0.2 * level_f),
        slow_amplitude=span * _SLOW_AMPLITUDE,
        slow_omega=2 * math.pi / (_SLOW_PERIOD * (0.8 + 0.4 * slow_f)),
        slow_phase=2 * math.pi * slow_p,
        fast_amplitude=span * _FAST_AMPLITUDE,
        fast_omega=2 * math.pi / (_FAST_PERIOD * (0.8 + 0.4 * fast_f)),
        fast_phase=2 * math.pi * fast_p,
        # Three 21-bit uniforms summed: Irwin-Hall, standard deviation `noise`, bounded ±3σ.
        noise_scale=profile.noise * 2 / (1 << 21),
        impossible=(profile.impossible_low, profile.impossible_high),
        scale=conversion.scale,
        offset=conversion.offset,
    )


class Simulator:
    """The running simulator: implements ``Collector``; see the module docstring."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._series = [
            _series(config, well, parameter)
            for well in config.wells
            for parameter in config.parameters
        ]
        # rate = a / b exactly as written (repr gives the shortest decimal, so 0.1 is 1/10):
        # tick k is at k * 1e6 * b / a microseconds.
        rate = Fraction(repr(float(config.rate)))
        self._period_num = 1_000_000 * rate.denominator
        self._period_den = rate.numerator
        self._bad_threshold = round(config.bad_quality_ratio * (1 << 26))
        self._out_of_range_threshold = round(config.out_of_range_ratio * (1 << 26))
        self._ticks_per_chunk = max(1, CHUNK_READINGS // len(self._series))

    @property
    def series_count(self) -> int:
        """Readings per tick: wells × parameters."""
        return len(self._series)

    def _micros(self, tick: int) -> int:
        # round(tick * period), half up, in integers: exact at any tick.
        return (2 * tick * self._period_num + self._period_den) // (2 * self._period_den)

    def tick_time(self, tick: int) -> datetime:
        """The instant of ``tick`` (UTC, microsecond resolution)."""
        return _EPOCH + timedelta(microseconds=self._micros(tick))

    def tick_of(self, instant: datetime) -> int:
        """The last tick at or before ``instant`` (a naive datetime is taken as UTC)."""
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        micros = (instant - _EPOCH) // _MICROSECOND
        tick = micros * self._period_den // self._period_num
        while self._micros(tick + 1) <= micros:
            tick += 1
        while self._micros(tick) > micros:
            tick -= 1
        return tick

    def _first_tick_at_or_after(self, instant: datetime) -> int:
        tick = self.tick_of(instant)
        return tick if self.tick_time(tick) == instant else tick + 1

    def readings_at(self, tick: int) -> list[Reading]:
        """Every series' reading at ``tick``: wells in order, each with its parameters in order."""
        micros = self._micros(tick)
        timestamp = _EPOCH + timedelta(microseconds=micros)
        seconds = micros / 1e6
        tick_bytes = tick.to_bytes(16, "little", signed=True)
        bad_threshold = self._bad_threshold
        oor_threshold = self._out_of_range_threshold
        sin = math.sin
        from_bytes = int.from_bytes
        good, bad = Quality.GOOD, Quality.BAD
        readings: list[Reading] = []
        append = readings.append
        for s in self._series:
            hasher = s.hasher.copy()
            hasher.update(tick_bytes)
            bits = from_bytes(hasher.digest(), "little")
            low, high = bits & _BITS64, bits >> 64
            if ((high >> 26) & _BITS26) < oor_threshold:
                band = s.impossible[(high >> 52) & 1]
                value = band[0] + (band[1] - band[0]) * (((high >> 53) & _BITS11) / 2048)
            else:
                uniforms = (low & _BITS21) + ((low >> 21) & _BITS21) + ((low >> 42) & _BITS21)
                value = (
                    s.level
                    + s.slow_amplitude * sin(s.slow_omega * seconds + s.slow_phase)
                    + s.fast_amplitude * sin(s.fast_omega * seconds + s.fast_phase)
                    + s.noise_scale * (uniforms - _NOISE_CENTRE)
                )
            quality = bad if (high & _BITS26) < bad_threshold else good
            append(
                Reading(
                    s.well,
                    s.parameter,
                    timestamp,
                    value * s.scale + s.offset,
                    s.unit,
                    quality,
                    s.tag,
                )
            )
        return readings

    def readings_between(self, first_tick: int, last_tick: int) -> Iterator[Reading]:
        """The readings of ticks ``first_tick`` to ``last_tick``, both included, in tick order."""
        for tick in range(first_tick, last_tick + 1):
            yield from self.readings_at(tick)

    async def probe(self) -> str:
        config = self.config
        return (
            f"simulating {len(config.wells)} wells × {len(config.parameters)} parameters "
            f"at {config.rate:g} Hz"
        )

    async def run(self, sink: ReadingSink) -> None:
        """Emit every tick from the watermark (or now) on, in chunks, until cancelled."""
        next_tick = await self._start_tick(sink)
        while True:
            now_tick = self.tick_of(datetime.now(UTC))
            if next_tick <= now_tick:
                last = min(now_tick, next_tick + self._ticks_per_chunk - 1)
                readings = [r for t in range(next_tick, last + 1) for r in self.readings_at(t)]
                await sink.emit(readings, {WATERMARK_KEY: str(last)})
                next_tick = last + 1
                # A sink that never suspends must not starve the loop while catching up.
                await asyncio.sleep(0)
                continue
            due = (self.tick_time(next_tick) - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(due, MIN_SLEEP))

    async def _start_tick(self, sink: ReadingSink) -> int:
        """Where to start: after the watermark, but no further back than ``backfill_limit``."""
        config = self.config
        now = datetime.now(UTC)
        now_tick = self.tick_of(now)
        stored = await sink.watermark(WATERMARK_KEY)
        if stored is None:
            log.info("simulator %s: no watermark, starting at tick %d", config.name, now_tick)
            return now_tick
        try:
            resume = int(stored) + 1
        except ValueError:
            log.warning(
                "simulator %s: watermark %r is not a tick; starting at tick %d instead",
                config.name,
                stored,
                now_tick,
            )
            return now_tick
        earliest = self._first_tick_at_or_after(now - config.backfill_limit)
        if resume < earliest:
            skipped = earliest - resume
            log.warning(
                "simulator %s: watermark tick %d is older than the backfill limit of %s; "
                "skipping %d ticks (%d readings) from %s to %s",
                config.name,
                resume - 1,
                config.backfill_limit,
                skipped,
                skipped * len(self._series),
                self.tick_time(resume).isoformat(),
                self.tick_time(earliest - 1).isoformat(),
            )
            return earliest
        log.info(
            "simulator %s: resuming at tick %d (%d ticks behind)",
            config.name,
            resume,
            max(0, now_tick - resume + 1),
        )
        return resume
