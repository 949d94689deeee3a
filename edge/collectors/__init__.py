"""The collector registry: every source type the agent knows, by its ``type:`` name.

A new collector is a module here with a ``SourceConfig`` subclass (whose ``type`` field is a
``Literal`` of its name) and an entry in ``SOURCE_TYPES``; the configuration loader builds its
discriminated union from this tuple.

Only the configuration models are imported here. A collector whose protocol library is heavy
(asyncua, SQLAlchemy, pymodbus, aiomqtt) keeps its model in a module of its own
(``opcua_config``, ``sql_config``, ``modbus_config``, ``mqtt._config``) and imports the
collector in ``build()``, so an agent loads only the libraries of the sources it runs.
"""

from __future__ import annotations

from edge.collectors.base import Collector, CollectorError, ReadingSink, SourceConfig
from edge.collectors.file_watcher import FileWatcherConfig
from edge.collectors.modbus_config import ModbusConfig
from edge.collectors.mqtt import MqttConfig
from edge.collectors.opcua_config import OpcUaConfig
from edge.collectors.pi_webapi import PiWebApiConfig
from edge.collectors.simulator import SimulatorConfig
from edge.collectors.sql_config import SqlConfig

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
