"""The Sparkplug B payload schema: the generated protobuf module of Eclipse Tahu's
``sparkplug_b.proto``, as the ``esio-spb-builder`` package ships it (only that module is used).

The import is kept here, and optional, so that the agent runs without the package as long as no
``sparkplug`` group is configured; a configuration with one is refused at load time instead.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MISSING_REASON", "available", "payload_class"]

_module: Any
try:
    _module = importlib.import_module("esio_spb_builder.core.sparkplug_b_pb2")
except ImportError:  # the package is not installed
    _module = None

MISSING_REASON = (
    "Sparkplug B needs the Python package esio-spb-builder (the Sparkplug B schema), "
    "which is not installed"
)


def payload_class() -> Any:
    """The ``org.eclipse.tahu.protobuf.Payload`` message class; ``RuntimeError`` when the
    package is missing (configurations are checked for it at load time)."""
    if _module is None:
        raise RuntimeError(MISSING_REASON)
    return _module.Payload


def available() -> bool:
    return _module is not None
