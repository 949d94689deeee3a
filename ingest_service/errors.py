"""The gateway's error tree and its translation into rich gRPC statuses.

    GatewayError                      every refusal the gateway answers with
    ├── InvalidToken                  UNAUTHENTICATED      invalid_token        (HTTP 401)
    ├── InsufficientScope             PERMISSION_DENIED    insufficient_scope   (HTTP 403)
    ├── TenantMismatch                PERMISSION_DENIED    tenant_mismatch      (HTTP 403)
    ├── UnknownTenant                 PERMISSION_DENIED    unknown_tenant       (HTTP 403)
    ├── InvalidRequest                INVALID_ARGUMENT     validation_error     (HTTP 400)
    ├── LimitExceeded                 RESOURCE_EXHAUSTED   rate_limit_exceeded  (HTTP 429, retry)
    │                                                      daily_volume_exceeded
    ├── PayloadTooLarge               RESOURCE_EXHAUSTED   payload_too_large    (HTTP 413)
    └── StorageUnavailable            UNAVAILABLE          storage_unavailable  (HTTP 503, retry)

Each error carries a ``google.rpc.ErrorInfo`` whose ``reason`` is the documented REST error code,
so Envoy can build the documented JSON body from the gRPC status alone. Validation errors add a
``google.rpc.BadRequest`` with one field violation per problem. Foreign exceptions (asyncpg, redis,
pyjwt) are translated into this tree where they are caught, never passed to the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "ERROR_DOMAIN",
    "FieldViolation",
    "GatewayError",
    "InsufficientScope",
    "InvalidRequest",
    "InvalidToken",
    "LimitExceeded",
    "PayloadTooLarge",
    "StorageUnavailable",
    "TenantMismatch",
    "UnknownTenant",
    "abort",
]

ERROR_DOMAIN = "ingest.welltegra.io"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One structural problem of a request: the field path and what is wrong with it."""

    field: str
    description: str


class GatewayError(Exception):
    """A refusal with a gRPC status code and a documented reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # Context for the client, sent in ErrorInfo.metadata (e.g. the failing batch_sequence).
        self.metadata: dict[str, str] = {}

    def details(self) -> list[any_pb2.Any]:
        """Rich error details sent with the status; subclasses add their own."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` sent as ``grpc-status-details-bin``."""
        code_number: int = self.code.value[0]
        return status_pb2.Status(code=code_number, message=self.message, details=self.details())


class InvalidToken(GatewayError):
    """The bearer token is missing, malformed, unsigned, expired or not for us."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "invalid_token"


class InsufficientScope(GatewayError):
    """The token is valid but does not grant ``api:ingest``."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "insufficient_scope"


class TenantMismatch(GatewayError):
    """The request names a tenant other than the token's."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "tenant_mismatch"


class UnknownTenant(GatewayError):
    """The token's tenant is malformed or has not been provisioned."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "unknown_tenant"


class InvalidRequest(GatewayError):
    """The request is structurally wrong; nothing of it is stored."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "validation_error"

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.violations = tuple(violations)

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [*super().details(), packed]


def _retry_info(seconds: float) -> any_pb2.Any:
    millis = max(0, round(seconds * 1000))  # to the millisecond: no float noise in the wait
    delay = duration_pb2.Duration(seconds=millis // 1000, nanos=(millis % 1000) * 1_000_000)
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return packed


class LimitExceeded(GatewayError):
    """A tenant is over its request rate or its daily volume; RetryInfo says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, reason: str, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), _retry_info(self.retry_after_seconds)]


class PayloadTooLarge(GatewayError):
    """A message over the tenant's size limit; waiting does not help, so no RetryInfo."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "payload_too_large"


class StorageUnavailable(GatewayError):
    """The database cannot be reached or failed; the client should retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "storage_unavailable"
    retryable = True

    def __init__(self, message: str, retry_after_seconds: int = 5) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), _retry_info(self.retry_after_seconds)]


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: GatewayError) -> NoReturn:
    """End the call with ``error`` as a rich status (code, message and details)."""
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=(("grpc-status-details-bin", error.to_status().SerializeToString()),),
    )
    raise AssertionError("context.abort returned")  # abort always raises; this satisfies mypy
