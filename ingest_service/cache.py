"""Stage 6 of the pipeline: the latest value per (tenant, well, parameter) in Redis, for
real-time alerting.

Keys are ``realtime:{tenant}:{well_id}:{parameter}`` (the braces are a Redis Cluster hash tag,
so a tenant's keys live on one shard) holding a hash of value, unit, quality and timestamp, with a
300 s TTL. A key is only replaced by a newer timestamp, so a late or resent older point never
overwrites a fresher one. One pipelined round trip per batch. Postgres is the source of truth:
a cache failure is logged and counted, never returned to the caller. Each update is one
``cache`` span (key count, and ``cache_unavailable`` when it failed; never keys or values).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from redis import asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from ingest_service.metrics import GatewayMetrics
from ingest_service.tracing import failed, stage
from ingest_service.validation import StoredPoint

__all__ = ["LatestValueCache", "cache_key"]

log = logging.getLogger(__name__)

# KEYS[1] = the point's key; ARGV = timestamp (epoch microseconds), value, unit, quality, ttl.
_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'ts_us')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'ts_us', ARGV[1], 'value', ARGV[2], 'unit', ARGV[3], 'quality', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def cache_key(tenant_id: str, well_id: str, parameter_name: str) -> str:
    return f"realtime:{{{tenant_id}}}:{well_id}:{parameter_name}"


class LatestValueCache:
    """Writes the newest point per key of each batch, if it is newer than what is cached."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int = 300,
        metrics: GatewayMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._ttl = ttl_seconds
        self._sha = hashlib.sha1(_SET_IF_NEWER.encode()).hexdigest()
        self.failures = 0
        self._failing = False

    async def update(self, tenant_id: str, points: Iterable[StoredPoint]) -> None:
        newest: dict[tuple[str, str], StoredPoint] = {}
        for point in points:
            key = (point.well_id, point.parameter_name)
            held = newest.get(key)
            if held is None or point.timestamp > held.timestamp:
                newest[key] = point
        if not newest:
            return
        attributes = {
            "db.system": "redis",
            "db.operation.name": "EVALSHA",
            "welltegra.cache.keys": len(newest),
        }
        with stage(self._tracer, "cache", attributes, SpanKind.CLIENT) as span:
            try:
                if not await self._run(tenant_id, newest):
                    # First use on this server (or after a restart of Redis): load, run again.
                    await self._client.script_load(_SET_IF_NEWER)
                    await self._run(tenant_id, newest)
            except (RedisError, OSError) as exc:
                failed(span, "cache_unavailable")
                self.failures += 1
                if self._metrics is not None:
                    self._metrics.cache_failures.inc()
                if not self._failing:
                    log.warning(
                        "latest-value cache unavailable, ingest continues without it: %s", exc
                    )
                    self._failing = True
                return
        if self._failing:
            log.info("latest-value cache is back")
            self._failing = False

    async def _run(self, tenant_id: str, newest: dict[tuple[str, str], StoredPoint]) -> bool:
        """One pipelined round trip of EVALSHA calls; False if the script is not loaded."""
        async with self._client.pipeline(transaction=False) as pipe:
            for (well_id, parameter), point in newest.items():
                ts_us = int(point.timestamp.timestamp() * 1_000_000)
                pipe.evalsha(
                    self._sha,
                    1,
                    cache_key(tenant_id, well_id, parameter),
                    ts_us,
                    repr(point.value),
                    point.unit,
                    point.quality_code,
                    self._ttl,
                )
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, NoScriptError):
                return False
            if isinstance(result, Exception):
                raise result
        return True

    async def close(self) -> None:
        await self._client.aclose()
