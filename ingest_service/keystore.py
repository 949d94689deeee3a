"""Tenants' data keys in PostgreSQL, wrapped by the master key; the keyrings the gateway seals
with, cached; and the operator's key actions (rotate, shred), each leaving an audit row.

A gateway caches a tenant's keyring for ``cache_seconds``: a rotation made elsewhere is used for
new writes within that time, and after a shred the tenant's writes are refused within that time
(values written meanwhile are sealed with a destroyed key, so they are unreadable too).
"""

from __future__ import annotations

import time

import asyncpg

from ingest_service.crypto import KeyProvider, KeyringError, TenantKeyring, new_data_key
from ingest_service.errors import UnknownTenant

__all__ = ["Keystore"]


def _context(tenant_id: str, version: int) -> bytes:
    # Binds a wrapped key to its tenant and version: rows cannot be swapped between them.
    return f"welltegra-dek:{tenant_id}:{version}".encode()


class Keystore:
    """Creates, rotates, shreds and unwraps tenants' data keys."""

    def __init__(
        self, pool: asyncpg.Pool, provider: KeyProvider | None, cache_seconds: float = 30.0
    ) -> None:
        self._pool = pool
        self._provider = provider
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, TenantKeyring]] = {}

    @property
    def can_wrap(self) -> bool:
        return self._provider is not None

    @property
    def provider(self) -> KeyProvider:
        if self._provider is None:
            raise KeyringError("no master key is loaded in this process")
        return self._provider

    async def create_first_key(self, conn: asyncpg.Connection, tenant_id: str) -> None:
        """Give a tenant its first data key (inside the caller's transaction), if it has none."""
        await conn.execute(
            "INSERT INTO welltegra.tenant_keys (tenant_id, version, wrapped_key)"
            " VALUES ($1, 1, $2) ON CONFLICT DO NOTHING",
            tenant_id,
            self.provider.wrap(new_data_key(), _context(tenant_id, 1)),
        )

    async def tenants_it_cannot_open(self) -> list[str]:
        """The tenants whose current data key this master key does not open: a gateway started
        with the wrong key would fail their every write, so start-up says so loudly."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT ON (tenant_id) tenant_id, version, wrapped_key"
            " FROM welltegra.tenant_keys WHERE wrapped_key IS NOT NULL"
            " ORDER BY tenant_id, version DESC"
        )
        unopened = []
        for row in rows:
            try:
                self.provider.unwrap(row["wrapped_key"], _context(row["tenant_id"], row["version"]))
            except KeyringError:
                unopened.append(row["tenant_id"])
        return unopened

    async def keyring(self, conn: asyncpg.Connection, tenant_id: str) -> TenantKeyring:
        """The tenant's keys, unwrapped; ``UnknownTenant`` once it is shredded."""
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        rows = await conn.fetch(
            "SELECT version, wrapped_key FROM welltegra.tenant_keys"
            " WHERE tenant_id = $1 AND wrapped_key IS NOT NULL",
            tenant_id,
        )
        if not rows:
            raise UnknownTenant(f"tenant {tenant_id!r} has no data key: it was shredded")
        keyring = TenantKeyring(
            tenant_id,
            {
                row["version"]: self.provider.unwrap(
                    row["wrapped_key"], _context(tenant_id, row["version"])
                )
                for row in rows
            },
        )
        self._cache[tenant_id] = (now + self._cache_seconds, keyring)
        return keyring

    async def rotate(self, tenant_id: str) -> int:
        """A new data key version for new writes; older versions stay for reading."""
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchval(
                "SELECT max(version) FROM welltegra.tenant_keys"
                " WHERE tenant_id = $1 AND wrapped_key IS NOT NULL",
                tenant_id,
            )
            if current is None:
                raise UnknownTenant(f"tenant {tenant_id!r} has no data key to rotate")
            # A new key under another master key would leave the tenant with keys that no one
            # master key opens: prove this one opens the current key first.
            wrapped = await conn.fetchval(
                "SELECT wrapped_key FROM welltegra.tenant_keys WHERE tenant_id = $1"
                " AND version = $2",
                tenant_id,
                current,
            )
            self.provider.unwrap(wrapped, _context(tenant_id, int(current)))
            version = int(current) + 1
            await conn.execute(
                "INSERT INTO welltegra.tenant_keys (tenant_id, version, wrapped_key)"
                " VALUES ($1, $2, $3)",
                tenant_id,
                version,
                self.provider.wrap(new_data_key(), _context(tenant_id, version)),
            )
            await _audit(conn, "tenants rotate-key", tenant_id, f"data key version {version}")
        self._cache.pop(tenant_id, None)
        return version

    async def shred(self, tenant_id: str) -> int:
        """Destroy every data key of the tenant: its stored values can never be read again.
        Returns how many keys were destroyed."""
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE welltegra.tenant_keys SET wrapped_key = NULL, destroyed_at = now()"
                " WHERE tenant_id = $1 AND wrapped_key IS NOT NULL",
                tenant_id,
            )
            registered = await conn.fetchval(
                "UPDATE welltegra.tenants SET shredded_at = coalesce(shredded_at, now())"
                " WHERE tenant_id = $1 RETURNING true",
                tenant_id,
            )
            if not registered:
                raise UnknownTenant(f"tenant {tenant_id!r} does not exist")
            destroyed = int(status.rsplit(" ", 1)[-1])
            await _audit(conn, "tenants shred", tenant_id, f"{destroyed} data keys destroyed")
        self._cache.pop(tenant_id, None)
        return destroyed


async def _audit(conn: asyncpg.Connection, action: str, tenant_id: str, message: str) -> None:
    # Operator actions are rare and must not be lost: written in their own transaction.
    await conn.execute(
        "INSERT INTO system_monitoring.audit_log (at, action, outcome, tenant_id, subject, message)"
        " VALUES (now(), $1, 'accepted', $2, 'operator', $3)",
        action,
        tenant_id,
        message,
    )
