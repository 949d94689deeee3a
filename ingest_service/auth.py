"""Stage 1 of the pipeline: who is calling. A server interceptor verifies the bearer token
before the request body is read, so nothing from an unauthenticated caller is parsed.

Tokens are JWTs signed with asymmetric algorithms only (``none`` and HMAC are refused: an HMAC
key would have to be shared with every issuer's client). Keys come from a JWKS URL (Auth0,
Keycloak, the development issuer), cached and refreshed on an unknown ``kid``, or from PEM files.
``exp`` is required; ``iss`` and ``aud`` must match; the scope must contain ``api:ingest`` as a
whole word; the tenant comes from a configurable claim (Auth0 wants namespaced custom claims).

The verified ``Principal`` reaches the service through a context variable set in the same task
that runs the handler.

The interceptor is also where a guarded call's trace begins on the gateway: it opens the call's
server span, continuing the caller's trace from the W3C ``traceparent`` in the call's metadata,
verifies the token inside an ``auth`` span, and the handler then runs under the call's span,
which ends with the call's gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from ingest_service.audit import AuditEvent, AuditLog
from ingest_service.config import AuthConfig
from ingest_service.errors import GatewayError, InsufficientScope, InvalidToken, abort
from ingest_service.metrics import GatewayMetrics
from ingest_service.tenancy import check_tenant_id
from ingest_service.tracing import TENANT, context_from_metadata, failed, stage, within

__all__ = ["AuthInterceptor", "Principal", "TokenVerifier", "current_principal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller: tenant, subject (client id) and granted scopes."""

    tenant_id: str
    subject: str
    scopes: frozenset[str]


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    # OAuth puts scopes in a space-separated "scope"; Auth0 RBAC adds a "permissions" list and
    # some issuers use "scp". Each is split into whole words: "api:ingest_readonly" is not
    # "api:ingest".
    found: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        found.update(scope.split())
    for key in ("scp", "permissions"):
        value = claims.get(key)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(item for item in value if isinstance(item, str))
    return frozenset(found)


class TokenVerifier:
    """Verifies a bearer token and returns its ``Principal``, or raises a ``GatewayError``."""

    def __init__(
        self,
        config: AuthConfig,
        issuer: str,
        extra_key_files: Iterable[Path] = (),
    ) -> None:
        self._config = config
        self._issuer = issuer
        self._algorithms = list(config.algorithms)
        self._keys = [
            load_pem_public_key(path.read_bytes())
            for path in (*config.public_key_files, *extra_key_files)
        ]
        self._jwks = (
            jwt.PyJWKClient(
                config.jwks_url,
                cache_keys=True,
                lifespan=config.jwks_cache.total_seconds(),
                cooldown_duration=config.jwks_refresh_cooldown.total_seconds(),
                timeout=5,
            )
            if config.jwks_url
            else None
        )

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken("access token is malformed") from exc
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise InvalidToken(
                f"token algorithm {algorithm!r} is not accepted; use one of {self._algorithms}"
            )
        claims = await self._decode(token, algorithm, header.get("kid"))
        return self._principal(claims)

    async def _candidate_keys(self, kid: Any) -> Sequence[Any]:
        if self._jwks is not None and isinstance(kid, str):
            try:
                # PyJWKClient does blocking HTTP; keep it off the event loop.
                signing_key = await asyncio.to_thread(self._jwks.get_signing_key, kid)
                return [signing_key.key, *self._keys]
            except jwt.PyJWKClientError as exc:
                if not self._keys:
                    raise InvalidToken(f"no key found for the token's key id: {exc}") from exc
        return self._keys

    async def _decode(self, token: str, algorithm: str, kid: Any) -> dict[str, Any]:
        keys = [key for key in await self._candidate_keys(kid) if _fits(key, algorithm)]
        error: jwt.PyJWTError = jwt.InvalidSignatureError("no key to verify with")
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=key,
                    algorithms=[algorithm],
                    audience=self._config.audience,
                    issuer=self._issuer,
                    leeway=self._config.leeway,
                    options={"require": ["exp", "iss", "aud"]},
                )
                return claims
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError) as exc:
                error = exc  # try the next key: several may be trusted during a rotation
            except jwt.InvalidTokenError as exc:
                raise InvalidToken(_describe(exc)) from exc
        raise InvalidToken(_describe(error)) from error

    def _principal(self, claims: dict[str, Any]) -> Principal:
        scopes = _scopes(claims)
        if self._config.required_scope not in scopes:
            raise InsufficientScope(f"token does not grant the scope {self._config.required_scope}")
        tenant = claims.get(self._config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidToken(f"token has no tenant claim {self._config.tenant_claim!r}")
        subject = claims.get("sub")
        return Principal(
            tenant_id=check_tenant_id(tenant),
            subject=subject if isinstance(subject, str) else "",
            scopes=scopes,
        )


_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def _fits(key: Any, algorithm: str) -> bool:
    """Whether ``key`` can verify ``algorithm`` (an RSA key cannot verify ES256, and so on)."""
    return isinstance(key, _KEY_TYPES.get(algorithm[:2], ()))


def _describe(exc: jwt.PyJWTError) -> str:
    # One clear sentence per failure; pyjwt's own messages are not meant for API clients.
    match exc:
        case jwt.ExpiredSignatureError():
            return "access token has expired"
        case jwt.ImmatureSignatureError():
            return "access token is not valid yet"
        case jwt.InvalidAudienceError():
            return "access token is for another audience"
        case jwt.InvalidIssuerError():
            return "access token is from an untrusted issuer"
        case jwt.MissingRequiredClaimError():
            return f"access token has no {exc.claim!r} claim"
        case jwt.InvalidSignatureError() | jwt.InvalidKeyError() | jwt.InvalidAlgorithmError():
            return "access token signature is not valid"
        case _:
            return "access token is invalid"


Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Verifies the token of every call to the guarded services; others (health, reflection)
    pass untouched."""

    def __init__(
        self,
        verifier: TokenVerifier,
        audit: AuditLog,
        guarded_prefix: str,
        metrics: GatewayMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._verifier = verifier
        self._audit = audit
        self._prefix = guarded_prefix
        self._metrics = metrics
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        action = details.method.rsplit("/", 1)[-1]
        call = _call_span(self._tracer, details)
        try:
            with within(call), stage(self._tracer, "auth"):
                principal = await self._verifier.verify(_bearer(details.invocation_metadata))
        except GatewayError as error:
            return self._refusing(handler, action, error, call)
        except BaseException:
            call.end()
            raise
        call.set_attribute(TENANT, principal.tenant_id)
        return _with_principal(handler, principal, call)

    def _refusing(
        self, handler: grpc.RpcMethodHandler, action: str, error: GatewayError, call: Span
    ) -> grpc.RpcMethodHandler:
        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            event = AuditEvent(
                action=action,
                outcome="refused",
                reason=error.reason,
                message=error.message,
                peer=context.peer(),
            )
            self._audit.record(event)
            if self._metrics is not None:
                self._metrics.record(event)
            with _serving(call, context):
                await abort(context, error)

        return _replace_behaviour(handler, lambda _original: refuse)


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise InvalidToken("authorization header must be 'Bearer <token>'")
            return token.strip()
    raise InvalidToken("no access token: send 'authorization: Bearer <token>'")


def _call_span(tracer: Tracer, details: grpc.HandlerCallDetails) -> Span:
    """The server span of one call, a child of the caller's span when its metadata names one."""
    name = details.method.lstrip("/")
    service, _, method = name.partition("/")
    return tracer.start_span(
        name,
        context=context_from_metadata(details.invocation_metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )


@contextlib.contextmanager
def _serving(call: Span, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
    """The handler's run under the call's span; the span ends with the call's status code."""
    try:
        with within(call):
            yield
    except BaseException as error:
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            cancelled = isinstance(error, asyncio.CancelledError)
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        call.set_attribute("rpc.grpc.status_code", code.value[0])
        failed(call, code.name)
        raise
    else:
        call.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    finally:
        call.end()


def _with_principal(
    handler: grpc.RpcMethodHandler, principal: Principal, call: Span
) -> grpc.RpcMethodHandler:
    def wrap(original: Behaviour) -> Behaviour:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            current_principal.set(principal)
            with _serving(call, context):
                return await original(request, context)

        return behaviour

    return _replace_behaviour(handler, wrap)


def _replace_behaviour(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour], Behaviour]
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour is ``wrap(original)``, for the two call shapes the
    ingest service has (unary and client streaming)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    raise TypeError(f"unsupported handler shape for {handler!r}")
