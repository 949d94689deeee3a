"""The collector registry: every source type the agent knows, by its ``type:`` name.

A new collector is a module here with a ``SourceConfig`` subclass (whose ``type`` field is a
``Literal`` of its name) and an entry in ``SOURCE_TYPES``; the configuration loader builds its
discriminated union from this tuple.
"""

from __future__ import annotations

from edge.collectors.base import Collector, CollectorError, ReadingSink, SourceConfig
from edge.collectors.file_watcher import FileWatcherConfig
from edge.collectors.modbus import ModbusConfig
from edge.collectors.mqtt import MqttConfig
from edge.collectors.opcua import OpcUaConfig
from edge.collectors.pi_webapi import PiWebApiConfig
from edge.collectors.simulator import SimulatorConfig
from edge.collectors.sql import SqlConfig

__all__ = [
    "SOURCE_TYPES",
    "Collector",
    "CollectorError",
    "ReadingSink",
    "SourceConfig",
    "source_type_names",
]

SOURCE_TYPES: tuple[type[SourceConfig], ...] = (
    SimulatorConfig, PiWebApiConfig, OpcUaConfig, MqttConfig, ModbusConfig, SqlConfig,
    FileWatcherConfig,
)


def source_type_names() -> list[str]:
    """The ``type:`` names of all registered collectors, sorted."""
    return sorted(str(model.model_fields["type"].default) for model in SOURCE_TYPES)
