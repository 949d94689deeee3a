"""Stage 3 of the pipeline: per-tenant limits (requests a minute, bytes a message, bytes a day).

The pipeline calls ``Limiter.admit`` for every request and every batch of a stream, with the
size of the message before it is parsed. This module holds the interface and the policy that
admits everything; the Redis token buckets plug in behind the same call.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["AdmitAll", "Limiter"]


class Limiter(Protocol):
    """Decides whether a tenant may send one more message of ``payload_bytes`` now."""

    async def admit(self, tenant_id: str, payload_bytes: int) -> None:
        """Return if admitted; raise a ``GatewayError`` (RESOURCE_EXHAUSTED) if not."""


class AdmitAll:
    """Admits every message: the policy when no limits are configured."""

    async def admit(self, tenant_id: str, payload_bytes: int) -> None:
        return None
