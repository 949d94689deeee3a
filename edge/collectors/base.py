"""The collector interface: what every source plugin implements, and what it may call.

A collector is a config model plus a factory. The config model (a subclass of
``SourceConfig`` with a ``type`` literal) is what a ``data_sources`` entry parses into; its
``build()`` makes the collector. The agent runs each enabled collector's ``run()`` as a task,
handing it a ``ReadingSink`` bound to that source.

Collectors do no batching and no retrying of uploads: they read, emit and move their watermark.
``emit`` returns once the readings (and the watermarks given with them) are durable in the
buffer, so a watermark never runs ahead of the data it stands for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from edge.readings import Reading

__all__ = ["Collector", "CollectorError", "ReadingSink", "SourceConfig"]


class CollectorError(Exception):
    """A source cannot be read. ``retryable`` says whether trying again later can help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ReadingSink(Protocol):
    """Where a collector puts what it read; bound to one source by the agent."""

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        """Buffer ``readings`` and, in the same transaction, set the source's ``watermarks``
        (key → opaque text). Returns when both are durable; waits while the buffer is full
        under the ``block`` policy."""
        ...

    async def watermark(self, key: str) -> str | None:
        """The watermark last stored for ``key`` by this source, or None."""
        ...

    def reject(self, reason: str, count: int = 1) -> None:
        """Count ``count`` records of the source the collector could not read (a CSV row, an
        MQTT payload's problem), by ``reason``: a short fixed name such as ``not_numeric``,
        never text from the record (it becomes a metric label). The collector reports the
        details itself (log, rejected-rows file)."""
        ...


class Collector(Protocol):
    """A running source. ``run`` reads until cancelled; ``probe`` checks it can connect."""

    async def run(self, sink: ReadingSink) -> None:
        """Read and emit until cancelled. Reconnects by itself where the protocol allows;
        raises ``CollectorError`` when it cannot go on (the agent restarts it with backoff)."""
        ...

    async def probe(self) -> str:
        """Connect once and say what was found (for ``test-connections``); raise
        ``CollectorError`` with the reason when it cannot."""
        ...


class SourceConfig(BaseModel):
    """The keys every ``data_sources`` entry has. Subclasses add a ``type`` literal and their
    own keys, and implement ``build``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Unique name of the source: metrics label, watermark owner, log prefix.",
    )
    enabled: bool = True

    def build(self) -> Collector:
        raise NotImplementedError(f"{type(self).__name__} does not build a collector")
