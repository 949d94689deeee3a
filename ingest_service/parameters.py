"""The parameter registry: which parameters exist, their canonical unit, the units accepted for
them and their valid range.

One definition serves the gateway (validation and conversion before storage) and the edge agent
(tag mapping and range flags), so the two can never disagree. A new parameter is a registry entry,
added by configuration, not a change of the contract.

Unit conversion is done by ``pint``. Every accepted (unit → canonical unit) conversion is affine,
so it is reduced once, at load time, to ``value * scale + offset``: converting a point on the hot
path is then two float operations instead of a pint round trip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

import pint
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_PARAMETERS",
    "UNIT_ALIASES",
    "Conversion",
    "Parameter",
    "ParameterRegistry",
    "ParameterSpec",
    "RegistryError",
]

# Field spellings of units mapped to pint expressions, where pint's own name differs or is
# ambiguous: an oilfield barrel is 42 US gallons, not pint's 31.5-gallon "barrel".
UNIT_ALIASES: Mapping[str, str] = {
    "bbl/day": "oil_barrel / day",
    "bbl/d": "oil_barrel / day",
    "m3/day": "meter ** 3 / day",
    "m3/h": "meter ** 3 / hour",
    "klbs": "kilopound",
    "lbs": "pound",
    "kN": "kilonewton / gravity",
    "t": "metric_ton",
    "degF": "degree_Fahrenheit",
    "degC": "degree_Celsius",
    "K": "kelvin",
}


class RegistryError(ValueError):
    """The registry's configuration is inconsistent (unknown or incompatible units, bad range)."""


class ParameterSpec(BaseModel):
    """One parameter as written in configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    canonical_unit: str
    units: tuple[str, ...] = ()
    min: float
    max: float

    @model_validator(mode="after")
    def _check_range(self) -> ParameterSpec:
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min > self.max:
            raise ValueError(f"range [{self.min}, {self.max}] is empty or not finite")
        return self


DEFAULT_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        name="wellhead_pressure",
        canonical_unit="psi",
        units=("psi", "bar", "kPa", "MPa"),
        min=0,
        max=15_000,
    ),
    ParameterSpec(
        name="hookload", canonical_unit="klbs", units=("klbs", "lbs", "t", "kN"), min=0, max=1_000
    ),
    ParameterSpec(
        name="flow_rate",
        canonical_unit="bbl/day",
        units=("bbl/day", "bbl/d", "m3/day", "m3/h"),
        min=0,
        max=50_000,
    ),
    ParameterSpec(
        name="downhole_temperature",
        canonical_unit="degF",
        units=("degF", "degC", "K"),
        min=-50,
        max=500,
    ),
    # Daily drilling report figures (one value per well and report day): footage drilled in the
    # report period, and hours spent drilling, tripping and in non-productive time. The hours
    # of one day's report cannot exceed 24.
    ParameterSpec(
        name="depth_drilled", canonical_unit="ft", units=("ft", "m"), min=0, max=40_000
    ),
    ParameterSpec(
        name="hours_drilling", canonical_unit="h", units=("h", "hr", "hour", "min"), min=0, max=24
    ),
    ParameterSpec(
        name="hours_tripping", canonical_unit="h", units=("h", "hr", "hour", "min"), min=0, max=24
    ),
    ParameterSpec(
        name="hours_npt", canonical_unit="h", units=("h", "hr", "hour", "min"), min=0, max=24
    ),
)


@dataclass(frozen=True, slots=True)
class Conversion:
    """An affine unit conversion: ``canonical = value * scale + offset``."""

    scale: float
    offset: float

    def apply(self, value: float) -> float:
        return value * self.scale + self.offset


@dataclass(frozen=True, slots=True)
class Parameter:
    """A loaded parameter: its canonical unit, accepted units with their conversions, and range."""

    name: str
    canonical_unit: str
    conversions: Mapping[str, Conversion]
    min: float
    max: float

    def to_canonical(self, value: float, unit: str) -> float:
        """Convert ``value`` in ``unit`` to the canonical unit; ``KeyError`` if not accepted."""
        return self.conversions[unit].apply(value)

    def in_range(self, canonical_value: float) -> bool:
        return self.min <= canonical_value <= self.max


@cache
def _unit_registry() -> pint.UnitRegistry:  # type: ignore[type-arg]  # pint's generics are internal
    # Building a pint registry parses its definition files: do it once per process.
    return pint.UnitRegistry()


def _conversion(unit: str, canonical_unit: str) -> Conversion:
    ureg = _unit_registry()
    source = UNIT_ALIASES.get(unit, unit)
    target = UNIT_ALIASES.get(canonical_unit, canonical_unit)
    try:
        zero, one, big = (
            float(ureg.Quantity(x, source).to(target).magnitude) for x in (0.0, 1.0, 1000.0)
        )
    except pint.errors.UndefinedUnitError as exc:
        raise RegistryError(f"unknown unit {exc.unit_names!r}") from exc
    except pint.errors.DimensionalityError as exc:
        raise RegistryError(f"unit {unit!r} cannot be converted to {canonical_unit!r}") from exc
    except (ValueError, ArithmeticError) as exc:
        raise RegistryError(f"unit {unit!r}: {exc}") from exc
    conversion = Conversion(scale=one - zero, offset=zero)
    # Logarithmic units (dB, dBm) convert, but not as value * scale + offset: refuse them
    # rather than store wrong numbers.
    if not math.isclose(conversion.apply(1000.0), big, rel_tol=1e-9, abs_tol=1e-9):
        raise RegistryError(f"unit {unit!r} does not convert to {canonical_unit!r} linearly")
    return conversion


class ParameterRegistry:
    """The loaded registry: look up a parameter by name, convert, check ranges."""

    def __init__(self, specs: Iterable[ParameterSpec] = DEFAULT_PARAMETERS) -> None:
        self._parameters: dict[str, Parameter] = {}
        for spec in specs:
            units = dict.fromkeys((spec.canonical_unit, *spec.units))
            try:
                conversions = {unit: _conversion(unit, spec.canonical_unit) for unit in units}
            except RegistryError as exc:
                raise RegistryError(f"parameter {spec.name!r}: {exc}") from exc
            # Later entries override earlier ones, so configuration can redefine a default.
            self._parameters[spec.name] = Parameter(
                name=spec.name,
                canonical_unit=spec.canonical_unit,
                conversions=conversions,
                min=spec.min,
                max=spec.max,
            )

    @classmethod
    def with_extra(cls, extra: Iterable[ParameterSpec]) -> ParameterRegistry:
        """The default parameters plus (or overridden by) ``extra``."""
        return cls((*DEFAULT_PARAMETERS, *extra))

    def get(self, name: str) -> Parameter | None:
        return self._parameters.get(name)

    def names(self) -> list[str]:
        return sorted(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)
