"""Gateway configuration: strict keys, typed durations, every problem reported with its path."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ingest_service.config import ConfigError, load_config, parse_duration

CONFIGS = Path(__file__).parent / "configs"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("200ms", 0.2), ("5s", 5), ("2m", 120), ("1h", 3600), ("7d", 604800), ("1.5s", 1.5)],
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == timedelta(seconds=expected)


@pytest.mark.parametrize("text", ["5", "five seconds", "5 y", "-1s", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_example_config_loads() -> None:
    config = load_config(CONFIGS / "good.yaml", environ={})
    assert config.auth.jwks_url == "https://id.example.test/.well-known/jwks.json"
    assert config.auth.leeway == timedelta(seconds=10)
    assert config.storage.future_tolerance == timedelta(minutes=2)
    assert config.parameters[0].name == "casing_pressure"
    assert config.token_key_problem() is None


def test_environment_and_flags_take_precedence() -> None:
    config = load_config(
        CONFIGS / "good.yaml",
        overrides={"grpc_listen": "127.0.0.1:0", "auth": {"audience": "aud-from-flag"}},
        environ={"DATABASE_URL": "postgresql://db.test/x", "REDIS_URL": "redis://cache.test/0"},
    )
    assert config.database_url == "postgresql://db.test/x"
    assert config.redis_url == "redis://cache.test/0"
    assert config.grpc_listen == "127.0.0.1:0"
    assert config.auth.audience == "aud-from-flag"
    # A flag for one auth key keeps the file's other auth keys.
    assert config.auth.jwks_url == "https://id.example.test/.well-known/jwks.json"


@pytest.mark.parametrize(
    ("name", "problems"),
    [
        (
            "unknown_key.yaml",
            ["unknown_key.yaml: auth.tenant_claims: Extra inputs are not permitted"],
        ),
        ("hmac.yaml", ["auth.algorithms: Value error, only asymmetric algorithms are allowed"]),
        (
            "several.yaml",
            [
                "grpc_listen: Value error, 'localhost' is not HOST:PORT",
                "storage.future_tolerance: Value error, 'soon' is not a duration",
                "parameters.0.min: Input should be a valid number",
            ],
        ),
        ("not_mapping.yaml", ["the top level must be a mapping"]),
        (
            "bad_units.yaml",
            [
                "auth.leeway: Value error, -5 is negative",
                "unit 'degC' cannot be converted to 'psi'",
            ],
        ),
        ("bad_yaml.yaml", ["not valid YAML"]),
    ],
)
def test_bad_configs_name_file_path_and_reason(name: str, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / name, environ={})
    for problem in problems:
        assert problem in str(error.value)
    assert str(CONFIGS / name) in str(error.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(CONFIGS / "absent.yaml", environ={})


def test_serving_needs_a_token_key_and_an_issuer() -> None:
    config = load_config(environ={})
    assert "no key to verify tokens" in (config.token_key_problem() or "")
    assert load_config(overrides={"dev": True}, environ={}).token_key_problem() is None
    jwks_only = load_config(overrides={"auth": {"jwks_url": "https://id.test/jwks"}}, environ={})
    assert "auth.issuer is required" in (jwks_only.token_key_problem() or "")
