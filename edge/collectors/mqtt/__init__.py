"""The ``mqtt`` collector: JSON and Sparkplug B messages from an MQTT broker (aiomqtt).

``_config`` holds the configuration models, ``_json`` the JSON mapping, ``_sparkplug`` the
Sparkplug B state and decoding, ``_collector`` the session with the broker. See
docs/collectors/mqtt.md.
"""

from __future__ import annotations

from edge.collectors.mqtt._collector import Mqtt, MqttStats
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
