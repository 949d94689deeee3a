"""Gateway configuration: one typed, strict model loaded from a YAML file, the environment and
command-line flags, in that order of increasing precedence.

Every problem is reported at start, all at once, with the file and the dotted key path, so a
mistyped key never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ingest_service.crypto import MasterKeyProvider, load_master_key
from ingest_service.parameters import ParameterRegistry, ParameterSpec

__all__ = [
    "AuthConfig",
    "ConfigError",
    "DevIssuerConfig",
    "Duration",
    "EnvoyConfig",
    "GatewayConfig",
    "LimitsConfig",
    "StorageConfig",
    "TlsConfig",
    "load_config",
    "parse_duration",
]

DEV_ISSUER = "urn:welltegra:dev-issuer"
DEFAULT_AUDIENCE = "https://api.welltegra.com"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    """The configuration cannot be used; the message lists every problem."""


def parse_duration(value: Any) -> Any:
    """Accept "200ms", "5s", "2m", "1h", "7d" or a number of seconds; leave the rest to pydantic."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration such as '200ms', '5s', '2m', '1h', '7d'")
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative; a duration is 0 or more")
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    """Server-side TLS for the gRPC listener (Envoy terminates TLS 1.3 in production)."""

    cert_file: Path
    key_file: Path


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]


class EnvoyConfig(_Strict):
    """The local Envoy front (``serve --envoy-listen``): TLS 1.3, REST and gRPC on one port."""

    listen: HostPort
    cert_file: Path | None = None
    key_file: Path | None = None
    config_dir: Path | None = Field(
        default=None, description="Folder with envoy.yaml and error_body.lua; default envoy/."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> EnvoyConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (or neither, for a dev cert)")
        return self


class AuthConfig(_Strict):
    """How access tokens are verified."""

    issuer: str | None = Field(
        default=None, description="Expected `iss`; defaults to the dev issuer with --dev."
    )
    audience: str = DEFAULT_AUDIENCE
    jwks_url: str | None = None
    jwks_cache: Duration = timedelta(minutes=5)
    # An unknown key id refetches the key set at most this often, so forged kids cannot make
    # the gateway hammer the identity provider.
    jwks_refresh_cooldown: Duration = timedelta(seconds=10)
    public_key_files: tuple[Path, ...] = ()
    tenant_claim: str = "tenant_id"
    required_scope: str = "api:ingest"
    leeway: Duration = timedelta(seconds=30)
    algorithms: tuple[str, ...] = (
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    )

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        refused = [a for a in value if a.lower() == "none" or a.upper().startswith("HS")]
        if refused:
            raise ValueError(f"only asymmetric algorithms are allowed, not {refused}")
        if not value:
            raise ValueError("at least one algorithm is needed")
        return value


class DevIssuerConfig(_Strict):
    """The development OAuth 2.0 issuer (``serve --dev-issuer``): client-credentials tokens
    for self-hosting, demos and tests. Production uses an identity provider (Auth0, Keycloak)."""

    enabled: bool = False
    listen: HostPort = "127.0.0.1:8081"
    issuer_url: str | None = Field(
        default=None,
        description="The tokens' `iss`; default https://localhost:<envoy port>/ behind the local"
        " Envoy, else the issuer's own http://HOST:PORT/.",
    )
    token_lifetime: Duration = Field(
        default=timedelta(hours=1), ge=timedelta(seconds=10), le=timedelta(days=1)
    )


class StorageConfig(_Strict):
    """PostgreSQL storage settings."""

    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=10, ge=1)
    statement_timeout: Duration = timedelta(seconds=30)
    connect_timeout: Duration = timedelta(seconds=5)
    # A batch's whole write, retries included, must finish within this or the call fails with
    # UNAVAILABLE and the sender resends (which is harmless).
    batch_timeout: Duration = timedelta(seconds=15)
    partitions_ahead_days: int = Field(default=2, ge=0, le=60)
    future_tolerance: Duration = timedelta(minutes=5)
    # How long a gateway keeps a tenant's unwrapped data keys before reading them again (a key
    # rotation or shred made elsewhere takes effect within this).
    key_cache: Duration = timedelta(seconds=30)
    # Points older than this are refused: it bounds the day partitions one batch can create.
    max_age: Duration = timedelta(days=3650)


class LimitsConfig(_Strict):
    """Per-tenant limits: the defaults, overridable per tenant (``tenants set-limits``)."""

    enabled: bool = True
    requests_per_minute: int = Field(default=100, ge=1)
    bytes_per_day: int = Field(default=1_000_000_000, ge=1)
    # Slower than this and Redis counts as down: limits then apply in-process.
    redis_timeout: Duration = Field(default=timedelta(milliseconds=50), gt=timedelta(0))
    overrides_cache: Duration = timedelta(seconds=30)


class GatewayConfig(_Strict):
    """Everything `welltegra-ingest serve` and the admin commands need."""

    grpc_listen: HostPort = "127.0.0.1:50051"
    data_dir: Path = Path(".welltegra")
    database_url: str | None = None
    redis_url: str | None = None
    tls: TlsConfig | None = None
    envoy: EnvoyConfig | None = None
    # GET /metrics (Prometheus text format) here, e.g. 127.0.0.1:9464. None: not served.
    metrics_listen: HostPort | None = None
    dev: bool = False
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig()
    limits: LimitsConfig = LimitsConfig()
    dev_issuer: DevIssuerConfig = DevIssuerConfig()
    # The master key that wraps tenants' data keys: WELLTEGRA_MASTER_KEY (base64 of 32 bytes)
    # or this file. With dev and neither, one is made in the data directory.
    master_key_file: Path | None = None
    cache_ttl: Duration = Field(default=timedelta(seconds=300), ge=timedelta(seconds=1))
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    parameters: tuple[ParameterSpec, ...] = ()

    @field_validator("parameters")
    @classmethod
    def _registry_loads(cls, value: tuple[ParameterSpec, ...]) -> tuple[ParameterSpec, ...]:
        # Unit errors (unknown, not convertible) are found now, with the rest of the problems.
        ParameterRegistry.with_extra(value)
        return value

    def token_key_problem(self) -> str | None:
        """Why the gateway could not verify tokens, or None. Only ``serve`` needs keys; the
        admin commands load the same file without them."""
        # The development issuer fills in auth.jwks_url and auth.issuer once it listens.
        running_issuer = self.dev_issuer.enabled
        if not (self.dev or running_issuer or self.auth.jwks_url or self.auth.public_key_files):
            return (
                "no key to verify tokens with: set auth.jwks_url or auth.public_key_files, "
                "or run with --dev to trust the local development key (or --dev-issuer to run "
                "the development OAuth issuer)"
            )
        if not self.issuer and not running_issuer:
            return "auth.issuer is required: tokens from any issuer would otherwise be accepted"
        return None

    @property
    def issuer(self) -> str | None:
        """The expected token issuer: the configured one, else the dev issuer in dev mode."""
        return self.auth.issuer or (DEV_ISSUER if self.dev else None)

    @property
    def dev_key_file(self) -> Path:
        return self.data_dir / "dev-signing-key.pem"

    def key_provider(self, environ: Mapping[str, str], *, admin: bool) -> MasterKeyProvider:
        """The master key, from the environment, the configured file, or the data directory's
        development key: made by ``serve --dev``, and used by admin commands on that data dir
        (never by a ``serve`` without ``--dev``)."""
        dev_file: Path | None = self.data_dir / "dev-master.key"
        if not (self.dev or (admin and dev_file is not None and dev_file.exists())):
            dev_file = None
        return MasterKeyProvider(load_master_key(environ, self.master_key_file, dev_file))


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"{source}: {path}: {problem['msg']}")
    return "\n".join(lines)


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> GatewayConfig:
    """Load the file (if any), then ``DATABASE_URL``/``REDIS_URL``, then flag ``overrides``."""
    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    source = str(path) if path else "configuration"
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    for key, variable in (("database_url", "DATABASE_URL"), ("redis_url", "REDIS_URL")):
        if environ.get(variable):
            data[key] = environ[variable]
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            # A flag overrides one key of a section, not the whole section from the file.
            section = data.get(key)
            merged = dict(section) if isinstance(section, dict) else {}
            merged.update({k: v for k, v in value.items() if v is not None})
            if merged:
                data[key] = merged
        elif value is not None:
            data[key] = value
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from exc
