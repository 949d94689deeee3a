"""What collectors produce: one reading per value read from a source, before transformation.

A reading already names its well and parameter (the collector's tag configuration says which tag
is which); the transform stage converts its unit and checks its range, the buffer seals it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["Quality", "Reading"]


class Quality(StrEnum):
    """The contract's quality codes. Sources map their own status codes onto these three."""

    GOOD = "GOOD"
    BAD = "BAD"
    UNCERTAIN = "UNCERTAIN"


@dataclass(frozen=True, slots=True)
class Reading:
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
