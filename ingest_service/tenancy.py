"""Stage 2 of the pipeline: the tenant of a request is the tenant of its verified token.

A tenant id names a Postgres schema (``<tenant_id>_streams``), so it is held to a strict pattern
here, and is still never pasted into SQL: identifiers are quoted by the server's ``quote_ident``.
"""

from __future__ import annotations

import re

from ingest_service.errors import TenantMismatch, UnknownTenant

__all__ = ["TENANT_ID_PATTERN", "check_tenant_id", "match_tenant"]

TENANT_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,47}$")


def check_tenant_id(tenant_id: str) -> str:
    """Return ``tenant_id`` if it is well formed, else raise ``UnknownTenant``."""
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise UnknownTenant(
            f"tenant id {tenant_id[:60]!r} is not valid: it must match {TENANT_ID_PATTERN.pattern}"
        )
    if tenant_id.startswith("pg_"):
        # PostgreSQL reserves schema names starting with pg_, and a tenant is a schema.
        raise UnknownTenant(f"tenant id {tenant_id!r} is not valid: pg_ is reserved")
    return tenant_id


def match_tenant(token_tenant: str, body_tenant: str) -> None:
    """A tenant named in the body must be the token's; an empty one means the token's."""
    if body_tenant and body_tenant != token_tenant:
        raise TenantMismatch("Token tenant_id does not match request tenant_id")
