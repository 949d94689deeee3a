"""The parameter registry: conversions agree with pint, ranges hold, bad config is refused."""

from __future__ import annotations

import pint
import pytest

from ingest_service.parameters import (
    DEFAULT_PARAMETERS,
    ParameterRegistry,
    ParameterSpec,
    RegistryError,
)


@pytest.mark.parametrize(
    ("parameter", "value", "unit", "expected"),
    [
        ("wellhead_pressure", 1.0, "bar", 14.503773773),
        ("wellhead_pressure", 100.0, "kPa", 14.503773773),
        ("wellhead_pressure", 6750.5, "psi", 6750.5),
        ("downhole_temperature", 100.0, "degC", 212.0),
        ("downhole_temperature", -40.0, "degC", -40.0),
        ("downhole_temperature", 273.15, "K", 32.0),
        ("flow_rate", 1.0, "m3/day", 6.28981077),
        ("hookload", 1000.0, "lbs", 1.0),
        ("hookload", 1.0, "t", 2.20462262),
    ],
)
def test_conversions(parameter: str, value: float, unit: str, expected: float) -> None:
    registry = ParameterRegistry()
    param = registry.get(parameter)
    assert param is not None
    assert param.to_canonical(value, unit) == pytest.approx(expected, rel=1e-8)


def test_precomputed_affine_conversion_matches_pint_everywhere() -> None:
    ureg = pint.UnitRegistry()
    registry = ParameterRegistry()
    param = registry.get("downhole_temperature")
    assert param is not None
    for value in (-459.67, -50.0, 0.0, 37.5, 1e6):
        direct = ureg.Quantity(value, "degree_Celsius").to("degree_Fahrenheit").magnitude
        assert param.to_canonical(value, "degC") == pytest.approx(direct, rel=1e-12, abs=1e-9)


def test_ranges_are_inclusive_and_in_canonical_units() -> None:
    param = ParameterRegistry().get("wellhead_pressure")
    assert param is not None
    assert param.in_range(0) and param.in_range(15_000)
    assert not param.in_range(-0.001) and not param.in_range(15_000.001)


def test_registry_is_extended_and_overridden_by_configuration() -> None:
    registry = ParameterRegistry.with_extra(
        [
            ParameterSpec(
                name="casing_pressure", canonical_unit="psi", units=("bar",), min=0, max=10_000
            ),
            ParameterSpec(
                name="wellhead_pressure", canonical_unit="bar", units=("psi",), min=0, max=1_000
            ),
        ]
    )
    assert len(registry) == len(DEFAULT_PARAMETERS) + 1
    casing = registry.get("casing_pressure")
    assert casing is not None and casing.to_canonical(1, "bar") == pytest.approx(14.5037738)
    wellhead = registry.get("wellhead_pressure")
    assert wellhead is not None and wellhead.canonical_unit == "bar"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            dict(name="x_pressure", canonical_unit="psi", units=("wibble",), min=0, max=1),
            "unknown unit",
        ),
        (
            dict(name="x_pressure", canonical_unit="psi", units=("degC",), min=0, max=1),
            "cannot be converted",
        ),
        (dict(name="x_power", canonical_unit="mW", units=("dBm",), min=0, max=1), "linearly"),
    ],
)
def test_bad_units_are_refused_at_load(spec: dict[str, object], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        ParameterRegistry([ParameterSpec.model_validate(spec)])


@pytest.mark.parametrize(
    "spec",
    [
        dict(name="Bad Name", canonical_unit="psi", min=0, max=1),
        dict(name="p", canonical_unit="psi", min=2, max=1),
        dict(name="p", canonical_unit="psi", min=0, max=float("inf")),
        dict(name="p", canonical_unit="psi", min=0, max=1, colour="red"),
    ],
)
def test_bad_specs_are_refused(spec: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ParameterSpec.model_validate(spec)
