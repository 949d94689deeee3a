"""The ``mqtt`` source's configuration: the broker, the session, and what each topic means."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.collectors.base import Collector, SourceConfig
from edge.collectors.mqtt._schema import MISSING_REASON, available
from ingest_service.config import Duration

__all__ = [
    "JsonTopic",
    "JsonValue",
    "MqttConfig",
    "MqttTlsConfig",
    "SparkplugGroup",
    "SparkplugMetric",
    "check_topic_filter",
]

SPARKPLUG_NAMESPACE = "spBv1.0"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_topic_filter(topic: str) -> str:
    """``topic`` if it is a valid MQTT topic filter, else ``ValueError`` saying why."""
    if not topic:
        raise ValueError("must not be empty")
    if "\x00" in topic:
        raise ValueError("must not contain a NUL character")
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError("'#' must be a whole level, and the last one")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level")
    return topic


class MqttTlsConfig(_Strict):
    """TLS towards the broker."""

    enabled: bool = False
    ca_file: Path | None = None  # None: the system's CA certificates
    cert_file: Path | None = None  # client certificate, when the broker asks for one
    key_file: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MqttTlsConfig:
        if not self.enabled and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("ca_file, cert_file and key_file apply only with enabled: true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together, or neither")
        return self


class JsonValue(_Strict):
    """One field of a JSON payload that is a point."""

    field: str = Field(min_length=1, description="Dotted path in the payload: data.pressure.")
    parameter: str = Field(min_length=1)
    unit: str = Field(min_length=1)


class JsonTopic(_Strict):
    """A topic filter whose messages are JSON objects (or lists of them), and how their
    fields map to points."""

    topic: str
    well_id: str | None = Field(default=None, min_length=1)
    well_id_topic_level: int | None = Field(default=None, ge=0)
    well_id_field: str | None = Field(default=None, min_length=1)
    timestamp_field: str | None = Field(default=None, min_length=1)
    timestamp_format: Literal["iso8601", "epoch_s", "epoch_ms"] = "iso8601"
    quality_field: str | None = Field(default=None, min_length=1)
    values: tuple[JsonValue, ...] = Field(min_length=1)

    @field_validator("topic")
    @classmethod
    def _filter(cls, topic: str) -> str:
        return check_topic_filter(topic)

    @model_validator(mode="after")
    def _well(self) -> JsonTopic:
        given = [
            key
            for key in ("well_id", "well_id_topic_level", "well_id_field")
            if getattr(self, key) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of well_id, well_id_topic_level and well_id_field"
                + (f" (got {', '.join(given)})" if given else "")
            )
        level = self.well_id_topic_level
        if level is not None:
            levels = self.topic.split("/")
            multi = levels[-1] == "#"
            if not multi and level >= len(levels):
                raise ValueError(
                    f"well_id_topic_level {level} is not a level of {self.topic!r} "
                    f"(it has {len(levels)}, counted from 0)"
                )
        fields = [v.field for v in self.values]
        if len(set(fields)) != len(fields):
            raise ValueError("values: each field may be mapped once")
        return self


class SparkplugMetric(_Strict):
    """A Sparkplug B metric (by its name in the BIRTH) that is a point."""

    name: str = Field(min_length=1)
    parameter: str = Field(min_length=1)
    unit: str = Field(min_length=1)
    edge_node: str | None = Field(default=None, min_length=1)  # None: any edge node
    device: str | None = Field(default=None, min_length=1)  # None: any device, or the node
    well_id: str | None = Field(default=None, min_length=1)


class SparkplugGroup(_Strict):
    """The edge nodes of one Sparkplug B group, and which of their metrics are points."""

    group_id: str = Field(min_length=1)
    edge_node: str = "+"
    well_id: str | None = Field(default=None, min_length=1)
    well_id_from: Literal["edge_node", "device"] | None = None
    metrics: tuple[SparkplugMetric, ...] = Field(min_length=1)
    request_rebirth: bool = True

    @field_validator("group_id", "edge_node")
    @classmethod
    def _level(cls, value: str) -> str:
        if any(c in value for c in "/#\x00") or ("+" in value and value != "+"):
            raise ValueError("must be one topic level without '/', '#' or a partial '+'")
        return value

    @field_validator("group_id")
    @classmethod
    def _no_wildcard_group(cls, value: str) -> str:
        if value == "+":
            raise ValueError("must name one group; give one entry per group")
        return value

    @property
    def topic(self) -> str:
        """The filter of every message of the group's chosen edge nodes."""
        return f"{SPARKPLUG_NAMESPACE}/{self.group_id}/+/{self.edge_node}/#"

    @model_validator(mode="after")
    def _well(self) -> SparkplugGroup:
        if self.well_id is not None and self.well_id_from is not None:
            raise ValueError("give well_id or well_id_from, not both")
        if self.well_id is None and self.well_id_from is None:
            orphans = [m.name for m in self.metrics if m.well_id is None]
            if orphans:
                raise ValueError(
                    "give well_id or well_id_from for the group, or a well_id for every metric "
                    f"(missing for {', '.join(map(repr, orphans))})"
                )
        return self


class MqttConfig(SourceConfig):
    """An MQTT broker and the topics to read from it: JSON payloads and Sparkplug B groups."""

    type: Literal["mqtt"] = "mqtt"
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)  # None: 1883, or 8883 with TLS
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    client_id: str = Field(min_length=1, max_length=256)
    username: str | None = None
    password: SecretStr | None = None
    tls: MqttTlsConfig = MqttTlsConfig()
    keepalive: Duration = timedelta(seconds=60)
    timeout: Duration = timedelta(seconds=10)
    session_expiry: Duration = timedelta(days=7)
    topics: tuple[JsonTopic, ...] = ()
    sparkplug: tuple[SparkplugGroup, ...] = ()

    @field_validator("keepalive")
    @classmethod
    def _keepalive(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=5) <= value <= timedelta(seconds=65535):
            raise ValueError("must be between 5s and 65535s")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be more than 0s")
        return value

    @field_validator("session_expiry")
    @classmethod
    def _expiry(cls, value: timedelta) -> timedelta:
        if not timedelta(0) < value <= timedelta(seconds=0xFFFFFFFE):
            raise ValueError("must be more than 0s and less than 136 years")
        return value

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if not self.topics and not self.sparkplug:
            raise ValueError("give at least one entry in topics or sparkplug")
        if self.sparkplug and not available():
            raise ValueError(f"sparkplug: {MISSING_REASON}")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        filters = [t.topic for t in self.topics] + [g.topic for g in self.sparkplug]
        duplicates = sorted({f for f in filters if filters.count(f) > 1})
        if duplicates:
            raise ValueError(f"topic filters appear twice: {', '.join(duplicates)}")
        return self

    @property
    def broker_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls.enabled else 1883

    def build(self) -> Collector:
        from edge.collectors.mqtt._collector import Mqtt

        return Mqtt(self)
