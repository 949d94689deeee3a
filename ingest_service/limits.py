"""Stage 3 of the pipeline: per-tenant limits, checked before a message is parsed.

* requests: ``requests_per_minute`` (a call counts as one: an ``IngestRealtime`` call, or an
  ``Ingest`` stream, charged at its first batch), as GCRA with a burst equal to the per-minute
  limit, so a tenant may send a minute's worth at once and then one every ``60 / limit``
  seconds. An agent keeps its live stream open for seconds and sends a batch every linger:
  counting its batches would refuse a live agent by default; its volume is what the daily
  limit bounds;
* message size: ``max_message_bytes`` per message;
* volume: ``bytes_per_day`` of payload per UTC day.

The state lives in Redis, changed by one atomic Lua script (EVALSHA) per message, so every
gateway process shares it. Keys carry the ``{tenant}`` hash tag, so a tenant's keys sit on one
Redis Cluster shard. The script reads Redis' clock, not ours, so gateways need no clock sync.

When Redis does not answer within ``redis_timeout`` (50 ms), the same limits apply from buckets
in this process instead (per process, so N gateways admit up to N times as much during the
outage): ingestion never stops because the cache is down. The gauge
``welltegra_gateway_limits_fallback_active`` and one log line per outage say so; Redis is tried
again after a second, and the fallback ends by itself.

A refusal is RESOURCE_EXHAUSTED with ErrorInfo ``rate_limit_exceeded`` or
``daily_volume_exceeded`` and RetryInfo holding the exact wait, or ``payload_too_large``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from redis import asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from ingest_service.errors import LimitExceeded, PayloadTooLarge
from ingest_service.metrics import GatewayMetrics

__all__ = [
    "AdmitAll",
    "ConfiguredLimits",
    "LimitPolicy",
    "Limiter",
    "RedisLimiter",
    "TenantLimits",
]

log = logging.getLogger(__name__)

# KEYS[1]: the tenant's GCRA "theoretical arrival time" (ms); KEYS[2]: bytes of this UTC day.
# ARGV: emission interval (ms), burst tolerance (ms), message bytes, bytes per day, and 1 if
# the message starts a call (charged a request) or 0 if it continues a stream (bytes only).
# Returns {0, 0} when admitted, {1, wait_ms} over the request rate, {2, wait_ms} over the volume.
_ADMIT = """
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local emission, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local size, day_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local charged = tonumber(ARGV[5]) == 1
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if charged and now < allow_at then
  return {1, allow_at - now}
end
local used = tonumber(redis.call('GET', KEYS[2]) or 0)
if used + size > day_limit then
  local until_midnight = 86400000 - (now % 86400000)
  return {2, until_midnight}
end
if charged then
  redis.call('SET', KEYS[1], tat + emission, 'PX', tolerance + emission + 1000)
end
redis.call('INCRBY', KEYS[2], size)
redis.call('PEXPIRE', KEYS[2], 90000000)
return {0, 0}
"""


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """One tenant's limits."""

    requests_per_minute: int = 100
    max_message_bytes: int = 10 * 1024 * 1024
    bytes_per_day: int = 1_000_000_000

    @property
    def emission_ms(self) -> int:
        return max(1, round(60_000 / self.requests_per_minute))

    @property
    def tolerance_ms(self) -> int:
        # A burst of requests_per_minute requests admitted at once.
        return self.emission_ms * (self.requests_per_minute - 1)


class TenantLimits(Protocol):
    """Where a tenant's policy comes from (configuration defaults, per-tenant overrides)."""

    async def policy(self, tenant_id: str) -> LimitPolicy: ...


class Limiter(Protocol):
    """Decides whether a tenant may send one more message of ``payload_bytes`` now."""

    async def admit(self, tenant_id: str, payload_bytes: int, *, new_call: bool = True) -> None:
        """Return if admitted; raise a ``GatewayError`` (RESOURCE_EXHAUSTED) if not.
        ``new_call`` is False for a stream's later messages: bytes only, no request."""


class ConfiguredLimits:
    """Configured defaults overridden by the tenant's own limits from the database, cached for
    ``ttl`` seconds so the hot path rarely asks. If the database cannot say, the last known
    policy (or the defaults) applies."""

    def __init__(
        self,
        defaults: LimitPolicy,
        overrides: Callable[[str], Awaitable[dict[str, int]]],
        ttl: float,
    ) -> None:
        self._defaults = defaults
        self._overrides = overrides
        self._ttl = ttl
        self._cache: dict[str, tuple[float, LimitPolicy]] = {}

    async def policy(self, tenant_id: str) -> LimitPolicy:
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            policy = replace(self._defaults, **await self._overrides(tenant_id))
        except Exception as exc:  # the database's own errors are many; any of them means "stale"
            log.warning("limits: cannot read overrides for %s (%s)", tenant_id, type(exc).__name__)
            policy = cached[1] if cached is not None else self._defaults
        self._cache[tenant_id] = (now + self._ttl, policy)
        return policy


class AdmitAll:
    """Admits every message: for tools and tests that need no limits."""

    async def admit(self, tenant_id: str, payload_bytes: int, *, new_call: bool = True) -> None:
        return None


@dataclass(slots=True)
class _LocalState:
    tat_ms: int = 0
    day: int = -1
    used_bytes: int = 0


class RedisLimiter:
    """Per-tenant limits in Redis, with an in-process fallback when Redis is away."""

    def __init__(
        self,
        client: aioredis.Redis | None,
        limits: TenantLimits,
        retry_redis_after: float = 1.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._limits = limits
        self._sha = hashlib.sha1(_ADMIT.encode()).hexdigest()
        self._local: dict[str, _LocalState] = {}
        self._retry_redis_after = retry_redis_after
        self._redis_down_until = 0.0
        self._in_fallback = False
        self.fallback_episodes = 0

    async def admit(self, tenant_id: str, payload_bytes: int, *, new_call: bool = True) -> None:
        policy = await self._limits.policy(tenant_id)
        if payload_bytes > policy.max_message_bytes:
            raise PayloadTooLarge(
                f"message of {payload_bytes} bytes is over the limit of "
                f"{policy.max_message_bytes} bytes"
            )
        outcome = None
        if self._client is not None and time.monotonic() >= self._redis_down_until:
            outcome = await self._admit_in_redis(
                self._client, tenant_id, payload_bytes, policy, new_call
            )
        if outcome is None:
            outcome = self._admit_locally(tenant_id, payload_bytes, policy, new_call)
        verdict, wait_ms = outcome
        if verdict == 1:
            raise LimitExceeded(
                "rate_limit_exceeded",
                f"{policy.requests_per_minute} requests/minute limit exceeded",
                wait_ms / 1000,
            )
        if verdict == 2:
            raise LimitExceeded(
                "daily_volume_exceeded",
                f"{policy.bytes_per_day} bytes/day limit exceeded",
                wait_ms / 1000,
            )

    async def _admit_in_redis(
        self,
        client: aioredis.Redis,
        tenant_id: str,
        payload_bytes: int,
        policy: LimitPolicy,
        new_call: bool,
    ) -> tuple[int, int] | None:
        day = datetime.now(UTC).strftime("%Y%m%d")
        keys = (f"limits:{{{tenant_id}}}:requests", f"limits:{{{tenant_id}}}:bytes:{day}")
        args = (
            policy.emission_ms,
            policy.tolerance_ms,
            payload_bytes,
            policy.bytes_per_day,
            int(new_call),
        )
        try:
            try:
                result = await client.evalsha(self._sha, 2, *keys, *args)
            except NoScriptError:
                await client.script_load(_ADMIT)
                result = await client.evalsha(self._sha, 2, *keys, *args)
        except (RedisError, OSError) as exc:
            if not self._in_fallback:
                log.warning(
                    "limits: Redis unavailable (%s); enforcing limits in-process until it is back",
                    type(exc).__name__,
                )
                self._in_fallback = True
                self.fallback_episodes += 1
                if self._metrics is not None:
                    self._metrics.limits_fallback_active.set(1)
            self._redis_down_until = time.monotonic() + self._retry_redis_after
            return None
        if self._in_fallback:
            log.info("limits: Redis is back; limits are shared across gateways again")
            self._in_fallback = False
            if self._metrics is not None:
                self._metrics.limits_fallback_active.set(0)
        return int(result[0]), int(result[1])

    def _admit_locally(
        self, tenant_id: str, payload_bytes: int, policy: LimitPolicy, new_call: bool
    ) -> tuple[int, int]:
        """The same GCRA and daily volume as the script, on this process's clock."""
        state = self._local.setdefault(tenant_id, _LocalState())
        now_ms = int(time.time() * 1000)
        tat = max(state.tat_ms, now_ms)
        allow_at = tat - policy.tolerance_ms
        if new_call and now_ms < allow_at:
            return 1, allow_at - now_ms
        day = now_ms // 86_400_000
        if state.day != day:
            state.day, state.used_bytes = day, 0
        if state.used_bytes + payload_bytes > policy.bytes_per_day:
            return 2, 86_400_000 - now_ms % 86_400_000
        if new_call:
            state.tat_ms = tat + policy.emission_ms
        state.used_bytes += payload_bytes
        return 0, 0
