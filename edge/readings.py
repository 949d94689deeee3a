"""What flows through the agent: readings from the collectors, points from the transform.

A reading already names its well and parameter (the collector's tag configuration says which tag
is which); the transform stage converts its unit and checks its range into a point; the buffer
writes points into the contract's ``DataPoint`` messages of a sealed batch (``add_points``).

Both are named tuples, not dataclasses or messages: a file or a backfill makes millions of them,
and a tuple is built three times faster than a frozen dataclass; a point written straight into
its batch's message costs a third of a ``DataPoint`` built alone and copied in (measured with
``bench/csv_ingest.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from welltegra.ingest.v1 import ingest_pb2

__all__ = ["Point", "Quality", "Reading", "add_points"]


class Quality(StrEnum):
    """The contract's quality codes. Sources map their own status codes onto these three."""

    GOOD = "GOOD"
    BAD = "BAD"
    UNCERTAIN = "UNCERTAIN"


class Reading(NamedTuple):
    """One value of one tag at one instant, as the source gave it.

    ``timestamp`` is timezone-aware (UTC). ``value`` is None when the source had no value (a BAD
    status without data): the transform counts and skips such readings, the contract has no
    place for a point without a value. ``tag`` is the source's own name for the value (node id,
    PI path, column), for logs and loss records.
    """

    well_id: str
    parameter: str
    timestamp: datetime
    value: float | None
    unit: str
    quality: Quality = Quality.GOOD
    tag: str = ""


class Point(NamedTuple):
    """A reading transformed: the fields of the contract's ``DataPoint``, checked, with the
    instant as Unix ``seconds`` and ``nanos`` (the ``Timestamp`` message's fields)."""

    well_id: str
    parameter_name: str
    seconds: int
    nanos: int
    value: float
    unit: str
    quality_code: str
    source: str


def add_points(
    into: RepeatedCompositeFieldContainer[ingest_pb2.DataPoint], points: Iterable[Point]
) -> None:
    """Append ``points`` to ``into`` (an ``IngestRequest``'s ``data_points``) as messages."""
    add = into.add
    for point in points:
        message = add()
        message.well_id = point.well_id
        message.parameter_name = point.parameter_name
        message.value = point.value
        message.unit = point.unit
        message.quality_code = point.quality_code
        message.source = point.source
        stamp = message.timestamp
        stamp.seconds = point.seconds
        stamp.nanos = point.nanos
