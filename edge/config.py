"""Agent configuration: one typed, strict model loaded from a YAML file, with ``${VAR}`` taken
from the environment.

The shape follows the customer's ``config.yaml`` (tenant, api, oauth, data_sources, buffer,
retry, logging, monitoring), corrected where the spec was wrong: the agent speaks gRPC to one
target, uploads continuously and retries for ever. Keys of the spec that no longer apply are
refused with advice, not ignored.

Every problem is reported at start, all at once, one per line, as ``<file>: <path>: <reason>``,
where a list entry is written ``data_sources[0] (name).rate``. A secret never appears in a
message.

Errors:

    AgentConfigError (ValueError)    the file cannot be used; permanent until it is edited
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from edge.collectors import SOURCE_TYPES, SourceConfig, source_type_names
from ingest_service.config import Duration, HostPort, parse_duration
from ingest_service.errors import UnknownTenant
from ingest_service.parameters import ParameterRegistry, ParameterSpec
from ingest_service.tenancy import check_tenant_id

__all__ = [
    "RETIRED_KEYS",
    "AgentConfig",
    "AgentConfigError",
    "ApiConfig",
    "ApiTlsConfig",
    "BufferConfig",
    "DataSource",
    "LoggingConfig",
    "MonitoringConfig",
    "OAuthConfig",
    "RetryConfig",
    "TenantConfig",
    "load_agent_config",
]


class AgentConfigError(ValueError):
    """The configuration cannot be used. The message lists every problem, one per line;
    ``problems`` holds the same lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def _agent_duration(value: Any) -> Any:
    # ``${VAR}`` always yields text: "300" from the environment means 300 seconds, as the
    # YAML number 300 does.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite duration")
    try:
        return parse_duration(value)
    except OverflowError:
        raise ValueError("is too long a duration") from None


# The gateway's duration ("200ms", "5s", "2m", "1h", "7d", a number of seconds), which here
# also takes a number written as text, and refuses infinite ones with a message.
_Duration = Annotated[Duration, BeforeValidator(_agent_duration)]


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _version_text(value: Any) -> Any:
    # ``version: 1.0`` without quotes is a YAML float.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(float(value))
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TenantConfig(_Strict):
    """Who the agent sends for. The gateway checks ``id`` against the token's tenant."""

    id: str
    name: str | None = None

    @field_validator("id")
    @classmethod
    def _well_formed(cls, value: str) -> str:
        try:
            return check_tenant_id(value)
        except UnknownTenant as exc:
            raise ValueError(str(exc)) from None


class ApiTlsConfig(_Strict):
    """TLS towards the gateway. Off only for a local gateway without TLS."""

    enabled: bool = True
    ca_file: Path | None = None
    server_name: str | None = None

    @model_validator(mode="after")
    def _settings_need_tls(self) -> ApiTlsConfig:
        if not self.enabled and (self.ca_file is not None or self.server_name is not None):
            raise ValueError("ca_file and server_name apply only with enabled: true")
        return self


class ApiConfig(_Strict):
    """The gateway's gRPC endpoint and how batches are streamed to it."""

    grpc_target: HostPort
    tls: ApiTlsConfig = ApiTlsConfig()
    timeout: _Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))
    keepalive_time: _Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))
    compression: Literal["gzip", "none"] = "gzip"
    max_batches_per_call: int = Field(default=64, ge=1, le=1000)
    backlog_share: float = Field(default=0.5, gt=0, le=1)
    live_window: _Duration = Field(default=timedelta(seconds=10), gt=timedelta(0))
    # The live lane keeps one Ingest call open this long, sending each batch as it is sealed:
    # points are stored at once, the call (and its acknowledgement) happens once a window.
    live_call_duration: _Duration = Field(
        default=timedelta(seconds=5), gt=timedelta(0), le=timedelta(minutes=5)
    )


def _check_http_url(value: str) -> str:
    # The value is not echoed: a URL may carry credentials.
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host or any(c.isspace() for c in value):
        raise ValueError("must be an http:// or https:// URL, e.g. https://id.example.com/token")
    return value


class OAuthConfig(_Strict):
    """The OAuth 2.0 client-credentials grant that yields the agent's access tokens."""

    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    audience: str = "https://api.welltegra.com"
    scope: str | None = None
    token_refresh_margin: _Duration = timedelta(seconds=300)
    timeout: _Duration = Field(default=timedelta(seconds=10), gt=timedelta(0))
    ca_file: Path | None = None

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("client_secret")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


class BufferConfig(_Strict):
    """The local SQLite buffer every point is written to before it is sent."""

    database_path: Path = Path("data/buffer.db")
    max_size_gb: float = Field(default=10, gt=0)
    retention_days: float = Field(default=7, gt=0)
    full_policy: Literal["drop_oldest", "block"] = "drop_oldest"
    batch_max_points: int = Field(default=1000, ge=1, le=1000)
    linger: _Duration = Field(
        default=timedelta(milliseconds=200), gt=timedelta(0), le=timedelta(seconds=10)
    )


class RetryConfig(_Strict):
    """Backoff between upload attempts; the uploader retries for ever."""

    initial_delay: _Duration = Field(default=timedelta(seconds=2), gt=timedelta(0))
    max_delay: _Duration = timedelta(seconds=300)
    backoff_multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _initial_within_max(self) -> RetryConfig:
        if self.initial_delay > self.max_delay:
            raise ValueError(
                f"initial_delay ({_format_duration(self.initial_delay)}) is more than "
                f"max_delay ({_format_duration(self.max_delay)})"
            )
        return self


class LoggingConfig(_Strict):
    """Where and how the agent logs."""

    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = "INFO"
    file: Path | None = None
    max_size_mb: int = Field(default=100, ge=1)
    backup_count: int = Field(default=5, ge=0)
    format: Literal["text", "json"] = "text"


class MonitoringConfig(_Strict):
    """The agent's only listening ports: health checks and Prometheus metrics."""

    listen_address: str = Field(default="127.0.0.1", min_length=1)
    health_check_port: int = Field(default=8080, ge=0, le=65535)
    prometheus_metrics_port: int = Field(default=9090, ge=0, le=65535)

    @model_validator(mode="after")
    def _distinct_ports(self) -> MonitoringConfig:
        if self.health_check_port and self.health_check_port == self.prometheus_metrics_port:
            raise ValueError(
                f"health_check_port and prometheus_metrics_port are both "
                f"{self.health_check_port}: they must differ (or be 0 for a free port)"
            )
        return self


if TYPE_CHECKING:
    DataSource: TypeAlias = SourceConfig
else:
    # Built from the registry, so a new collector only registers in SOURCE_TYPES.
    DataSource = Annotated[typing.Union[SOURCE_TYPES], Field(discriminator="type")]  # noqa: UP007


def _duplicate_names(names: Sequence[object]) -> list[str]:
    """One message per source name used by more than one entry."""
    seen: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        if isinstance(name, str):
            seen.setdefault(name, []).append(index)
    return [
        f"source name {name!r} is used by "
        + " and ".join(f"data_sources[{i}]" for i in indexes)
        + "; names must be unique"
        for name, indexes in seen.items()
        if len(indexes) > 1
    ]


class AgentConfig(_Strict):
    """Everything the edge agent needs, as loaded by ``load_agent_config``."""

    version: Annotated[Literal["1.0"], BeforeValidator(_version_text)] = "1.0"
    tenant: TenantConfig
    api: ApiConfig
    oauth: OAuthConfig
    data_sources: tuple[DataSource, ...] = ()
    buffer: BufferConfig = BufferConfig()
    retry: RetryConfig = RetryConfig()
    logging: LoggingConfig = LoggingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    parameters: tuple[ParameterSpec, ...] = ()

    _registry: ParameterRegistry | None = PrivateAttr(default=None)

    @field_validator("data_sources")
    @classmethod
    def _unique_names(cls, value: tuple[DataSource, ...]) -> tuple[DataSource, ...]:
        duplicates = _duplicate_names([source.name for source in value])
        if duplicates:
            raise ValueError("; ".join(duplicates))
        return value

    @field_validator("parameters")
    @classmethod
    def _registry_loads(cls, value: tuple[ParameterSpec, ...]) -> tuple[ParameterSpec, ...]:
        # Unit errors (unknown, not convertible) are found now, with the rest of the problems.
        ParameterRegistry.with_extra(value)
        return value

    def registry(self) -> ParameterRegistry:
        """The default parameters plus (or overridden by) ``parameters``; built once."""
        if self._registry is None:
            self._registry = ParameterRegistry.with_extra(self.parameters)
        return self._registry

    def enabled_sources(self) -> tuple[DataSource, ...]:
        """The sources to run; disabled ones stay in ``data_sources`` for ``check-config``."""
        return tuple(source for source in self.data_sources if source.enabled)

    def summary(self) -> str:
        """A few lines for ``check-config``: what the agent will do. Never the secret."""
        tenant = self.tenant.id + (f" ({self.tenant.name})" if self.tenant.name else "")
        tls = "TLS" if self.api.tls.enabled else "no TLS"
        enabled = len(self.enabled_sources())
        buffer = self.buffer
        lines = [
            f"tenant:        {tenant}",
            f"gateway:       {self.api.grpc_target} ({tls}, {self.api.compression}, "
            f"timeout {_format_duration(self.api.timeout)})",
            f"token URL:     {self.oauth.token_url}",
            f"client id:     {self.oauth.client_id}",
            f"sources:       {len(self.data_sources)} ({enabled} enabled)",
        ]
        lines += [
            f"  {source.name}: {_type_name(source)}, "
            + ("enabled" if source.enabled else "disabled")
            for source in self.data_sources
        ]
        lines += [
            f"buffer:        {buffer.database_path}: at most {buffer.max_size_gb:g} GB and "
            f"{buffer.retention_days:g} days, {buffer.full_policy} when full; batches of up to "
            f"{buffer.batch_max_points} points, linger {_format_duration(buffer.linger)}",
            f"retry:         {_format_duration(self.retry.initial_delay)} to "
            f"{_format_duration(self.retry.max_delay)}, x{self.retry.backoff_multiplier:g}, "
            "for ever",
            f"logging:       {self.logging.level} to {self.logging.file or 'stderr'}",
            f"monitoring:    health on {self.monitoring.listen_address}:"
            f"{self.monitoring.health_check_port}, metrics on "
            f"{self.monitoring.listen_address}:{self.monitoring.prometheus_metrics_port}",
            f"parameters:    {len(self.registry())} ({', '.join(self.registry().names())})",
        ]
        return "\n".join(lines)


def _type_name(source: SourceConfig) -> str:
    # ``type`` is declared by each SourceConfig subclass, not by the base.
    return str(type(source).model_fields["type"].default)


def _format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    if seconds < 1 and seconds > 0:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# Keys of the customer's config.yaml that the agent does not take, and what to do instead.
RETIRED_KEYS: Mapping[tuple[str, str], str] = {
    ("api", "base_url"): "the agent speaks gRPC: use api.grpc_target (HOST:PORT) and "
    "oauth.token_url instead",
    ("api", "ingestion_endpoint"): "the agent speaks gRPC: use api.grpc_target (HOST:PORT) "
    "and oauth.token_url instead",
    ("api", "auth_endpoint"): "use oauth.token_url (the full URL of the token endpoint) instead",
    ("buffer", "enabled"): "the buffer is always on: every point is written to it before it "
    "is sent; remove the key",
    ("buffer", "flush_interval"): "the agent uploads continuously, as soon as a batch is "
    "sealed (see buffer.linger and buffer.batch_max_points); remove the key",
    ("retry", "max_attempts"): "the agent retries for ever, bounded by buffer.retention_days "
    "and buffer.max_size_gb; remove the key",
    ("monitoring", "alert_webhook"): "alerting belongs to Prometheus alert rules on the "
    "agent's metrics (monitoring.prometheus_metrics_port); remove the key",
}

_REFERENCE = re.compile(r"\$\$|\$\{[^}]*\}|\$\{")
_NAMED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)

_Loc = tuple[int | str, ...]


def _substitute(
    node: Any, environ: Mapping[str, str], path: _Loc, problems: list[tuple[_Loc, str]]
) -> Any:
    """``node`` with ``${VAR}``, ``${VAR:-default}`` and ``$$`` replaced in string scalars.

    Runs on parsed YAML, so a value can never inject structure. Problems are collected with
    the path of the value they occur in."""
    if isinstance(node, dict):
        return {
            key: _substitute(value, environ, (*path, key), problems) for key, value in node.items()
        }
    if isinstance(node, list):
        return [_substitute(value, environ, (*path, i), problems) for i, value in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        text = match.group()
        if text == "$$":
            return "$"
        named = _NAMED.fullmatch(text[2:-1]) if text.endswith("}") else None
        if named is None:
            problems.append(
                (
                    path,
                    f"{text!r} is not a reference: write ${{NAME}}, ${{NAME:-default}}, "
                    "or $$ for a literal $",
                )
            )
            return text
        name, default = named.groups()
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            problems.append((path, f"environment variable {name} is not set and has no default"))
            return text
        return value

    return _REFERENCE.sub(replace, node)


def _retire(data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[_Loc, str]]]:
    """``data`` without the retired keys, and one problem per retired key found."""
    problems: list[tuple[_Loc, str]] = []
    data = dict(data)
    for (section, key), advice in RETIRED_KEYS.items():
        block = data.get(section)
        if isinstance(block, dict) and key in block:
            problems.append(((section, key), f"is not supported: {advice}"))
            data[section] = {k: v for k, v in block.items() if k != key}
    return data, problems


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The type under ``Annotated`` and ``X | None``, and whether it is a discriminated union."""
    discriminated = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *metadata = get_args(annotation)
            discriminated |= any(isinstance(m, FieldInfo) and m.discriminator for m in metadata)
        elif origin in (typing.Union, UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation, discriminated
            annotation = members[0]
        else:
            return annotation, discriminated


def _step(annotation: Any, part: int | str) -> tuple[Any, bool]:
    """The type found one ``loc`` part below ``annotation``, and whether the part is a union tag."""
    core, discriminated = _unwrap(annotation)
    if discriminated and isinstance(part, str):
        members = get_args(core) if get_origin(core) in (typing.Union, UnionType) else (core,)
        tagged = [m for m in members if m.model_fields["type"].default == part]
        return (tagged[0] if tagged else None), True
    origin = get_origin(core)
    if isinstance(part, int):
        return (get_args(core)[0] if origin in (tuple, list) else None), False
    if origin is dict:
        return get_args(core)[1], False
    if isinstance(core, type) and issubclass(core, BaseModel):
        field = core.model_fields.get(part)
        return (field.annotation if field is not None else None), False
    return None, False


def _describe(loc: _Loc, data: Any, *, tagged: bool) -> tuple[str, Any]:
    """``loc`` as a readable path (``data_sources[0] (name).rate``), and the type there.

    ``tagged``: the loc is pydantic's, with union tags to skip, and types are followed."""
    text = ""
    annotation: Any = AgentConfig if tagged else None
    node = data
    for part in loc:
        if annotation is not None:
            annotation, is_tag = _step(annotation, part)
            if is_tag:
                continue
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            text += f"[{part}]" + (f" ({name})" if isinstance(name, str) and name else "")
        else:
            node = node.get(part) if isinstance(node, dict) else None
            text += f".{part}" if text else str(part)
    return text or "(top level)", annotation


_BOUNDS = {
    "greater_than": ("gt", "must be more than"),
    "greater_than_equal": ("ge", "must be at least"),
    "less_than": ("lt", "must be less than"),
    "less_than_equal": ("le", "must be at most"),
}
# Shapes in YAML's words rather than Python's.
_SHAPES = {
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
}
# pydantic's own messages of these kinds never repeat the input, so they are safe for secrets.
_SECRET_SAFE = {"missing", "string_type", "bytes_type", "too_short", "too_long", "extra_forbidden"}


def _reason(problem: Mapping[str, Any], data: Any, annotation: Any) -> str:
    kind = problem["type"]
    ctx = problem.get("ctx") or {}
    if _unwrap(annotation)[0] in (SecretStr, SecretBytes):
        input_value = problem.get("input")
        if kind not in _SECRET_SAFE and input_value not in ("", b""):
            return "is not valid (the value is a secret and is not shown)"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        parent = _describe(problem["loc"][:-1], data, tagged=True)[1]
        return _unknown_key(str(problem["loc"][-1]), _unwrap(parent)[0])
    if kind == "union_tag_invalid":
        known = ", ".join(source_type_names())
        return f"unknown source type {ctx.get('tag')!r}; the known types are: {known}"
    if kind == "union_tag_not_found":
        return f"type is required; the known types are: {', '.join(source_type_names())}"
    if kind in _SHAPES:
        return _SHAPES[kind]
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        bound = ctx.get(key)
        # pydantic gives a duration's bound as text ("10 seconds"), a number's as a number.
        shown = f"{bound:g}" if isinstance(bound, float) else f"{bound}"
        return f"{words} {shown}"
    if kind == "too_short" and "min_length" in ctx:
        count = ctx["min_length"]
        return f"must have at least {count} item{'s' if count != 1 else ''}"
    message = str(problem["msg"])
    return message.removeprefix("Value error, ")


def _unknown_key(key: str, model: Any) -> str:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "unknown key"
    keys = list(model.model_fields)
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (the keys here are: {', '.join(keys)})"


def _validation_problems(error: ValidationError, data: Any) -> Iterator[tuple[str, str]]:
    for problem in error.errors(include_url=False):
        path, annotation = _describe(problem["loc"], data, tagged=True)
        yield path, _reason(problem, data, annotation)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise AgentConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        # Built from the parts, not str(exc): that quotes the line, which may hold a secret.
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise AgentConfigError([f"{path}: not valid YAML: {where}{exc.problem}"]) from exc
    except yaml.YAMLError as exc:
        raise AgentConfigError([f"{path}: not valid YAML"]) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise AgentConfigError([f"{path}: the top level must be a mapping of keys (tenant: ...)"])
    return loaded


def load_agent_config(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read ``path``, substitute ``${VAR}`` from ``environ`` (default: the process environment)
    and validate. Raises ``AgentConfigError`` listing every problem."""
    environ = os.environ if environ is None else environ
    raw = _read(path)
    env_problems: list[tuple[_Loc, str]] = []
    data = _substitute(raw, environ, (), env_problems)
    data, retired = _retire(data)
    problems = [(_describe(loc, data, tagged=False)[0], reason) for loc, reason in env_problems]
    problems += [(_describe(loc, data, tagged=False)[0], reason) for loc, reason in retired]
    sources = data.get("data_sources")
    if isinstance(sources, list):
        names = [entry.get("name") if isinstance(entry, dict) else None for entry in sources]
        problems += [("data_sources", reason) for reason in _duplicate_names(names)]
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        # A value whose variable is unset is reported once, as such, not again as invalid.
        unset = {where for where, _ in problems[: len(env_problems)]}
        problems += [p for p in _validation_problems(exc, data) if p[0] not in unset]
    else:
        if not problems:
            return config
    # The duplicate-name check runs before and during validation: keep one of each line.
    raise AgentConfigError(list(dict.fromkeys(f"{path}: {w}: {r}" for w, r in problems)))
