"""The ``mqtt`` collector: JSON and Sparkplug B messages from an MQTT broker (aiomqtt).

``_config`` holds the configuration models, ``_json`` the JSON mapping, ``_sparkplug`` the
Sparkplug B state and decoding, ``_collector`` the session with the broker. See
docs/collectors/mqtt.md.

``_collector`` (aiomqtt and paho) is imported when ``Mqtt`` or ``MqttStats`` is first used (or
by ``MqttConfig.build()``), not with this package: loading an agent's configuration does not
load them unless an ``mqtt`` source is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.collectors.mqtt._config import (
    JsonTopic,
    JsonValue,
    MqttConfig,
    MqttTlsConfig,
    SparkplugGroup,
    SparkplugMetric,
)
from edge.collectors.mqtt._json import parse_timestamp
from edge.collectors.mqtt._sparkplug import REBIRTH_HOLDOFF, REBIRTH_METRIC, rebirth_request

if TYPE_CHECKING:
    from edge.collectors.mqtt._collector import Mqtt, MqttStats

__all__ = [
    "REBIRTH_HOLDOFF",
    "REBIRTH_METRIC",
    "JsonTopic",
    "JsonValue",
    "Mqtt",
    "MqttConfig",
    "MqttStats",
    "MqttTlsConfig",
    "SparkplugGroup",
    "SparkplugMetric",
    "parse_timestamp",
    "rebirth_request",
]


def __getattr__(name: str) -> object:
    if name in ("Mqtt", "MqttStats"):
        from edge.collectors.mqtt import _collector

        return getattr(_collector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
