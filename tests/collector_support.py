"""Helpers shared by the collector integration tests (tests/integration/test_collector_*.py):
an in-memory ``ReadingSink``, ``running()`` for a collector as a task, the smallest agent
configuration a sample's ``data_sources`` can be loaded into (``agent_file()`` writes it with
given sources), ``load_sample()`` to load a
collector's sample config into it, ``sample_text()`` for the part of a sample its doc page
shows, and ``free_port``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from edge.collectors.base import Collector, CollectorError, ReadingSink
from edge.config import AgentConfig, load_agent_config
from edge.readings import Reading
from tests.e2e.stack import free_port

__all__ = [
    "MINIMAL_AGENT",
    "MemorySink",
    "agent_file",
    "free_port",
    "load_sample",
    "running",
    "sample_text",
]

SAMPLES = Path(__file__).parents[1] / "edge" / "collectors" / "samples"

MINIMAL_AGENT: dict[str, Any] = {
    "tenant": {"id": "acme_oil"},
    "api": {"grpc_target": "127.0.0.1:50051", "tls": {"enabled": False}},
    "oauth": {
        "token_url": "http://127.0.0.1:8081/token",
        "client_id": "agent",
        "client_secret": "secret",
    },
}


def agent_file(tmp_path: Path, sources: Sequence[Mapping[str, Any]]) -> Path:
    """``tmp_path / "agent.yaml"``: ``MINIMAL_AGENT`` with ``sources`` as its ``data_sources``."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL_AGENT, "data_sources": list(sources)}))
    return path


def load_sample(tmp_path: Path, name: str, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """edge/collectors/samples/<name>.yaml's ``data_sources`` loaded into ``MINIMAL_AGENT``,
    as the agent would load them (``environ`` as ``load_agent_config`` takes it)."""
    sample = yaml.safe_load((SAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    return load_agent_config(agent_file(tmp_path, sample["data_sources"]), environ=environ)


def sample_text(name: str) -> str:
    """edge/collectors/samples/<name>.yaml from ``data_sources:`` on, as docs/collectors/<name>.md
    shows it (Telegraf's sample.conf habit)."""
    text = (SAMPLES / f"{name}.yaml").read_text(encoding="utf-8")
    return text[text.index("data_sources:") :]


class MemorySink:
    """A ``ReadingSink`` that keeps everything in memory; its watermarks outlive the
    collectors that use it, as the buffer's do.

    ``emits`` counts calls of ``emit`` and ``count`` the readings given; with ``keep=False``
    the readings are only counted, not kept. ``watermarks`` are the initial watermarks."""

    def __init__(
        self, watermarks: Mapping[str, str] | None = None, *, keep: bool = True
    ) -> None:
        self.keep = keep
        self.readings: list[Reading] = []
        self.watermarks: dict[str, str] = dict(watermarks or {})
        self.emits = 0
        self.count = 0
        self.rejected: Counter[str] = Counter()

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        self.emits += 1
        self.count += len(readings)
        if self.keep:
            self.readings.extend(readings)
        self.watermarks.update(watermarks or {})

    async def watermark(self, key: str) -> str | None:
        return self.watermarks.get(key)

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] += count

    def identities(self) -> list[tuple[str, str, datetime]]:
        return [(r.well_id, r.parameter, r.timestamp) for r in self.readings]


@contextlib.asynccontextmanager
async def running(
    collector: Collector,
    sink: ReadingSink,
    *,
    tolerate: tuple[type[BaseException], ...] = (CollectorError,),
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``collector`` into ``sink`` as a task while the block runs, then cancel it.

    Besides the cancellation, what stopped the task is swallowed at the end if it is one of
    ``tolerate`` (a ``CollectorError`` unless told otherwise) and raised if not."""
    task = asyncio.create_task(collector.run(sink))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, *tolerate):
            await task
