"""The development OAuth 2.0 issuer: client-credentials tokens for self-hosting, the demo and
tests, so the gateway can be run end to end without an identity provider. Production uses one
(Auth0, Keycloak); the gateway verifies this issuer's tokens exactly as it verifies theirs,
through the JWKS URL.

    POST /oauth/token             client-credentials grant (RFC 6749 §4.4): a signed JWT
    GET  /.well-known/jwks.json   the public keys: the current one and the one before it

Clients live in ``welltegra.oauth_clients`` (one tenant each; secrets only as scrypt hashes).
Signing keys are ES256 (P-256) keys in ``<data_dir>/dev-issuer/`` (private keys mode 0600):
``current.pem`` signs, ``previous.pem`` is still published so tokens signed before a rotation
verify until they expire. A running issuer notices a rotation (``welltegra-ingest issuer
rotate``, from any process) at its next request.

Errors are RFC 6749 §5.2 bodies, ``{"error": ..., "error_description": ...}``, never cached:

    invalid_request          400  malformed or repeated parameter, other audience,
                                  unsupported media type; 413 for a body over 64 KiB
    invalid_client           401  unknown or revoked client, wrong secret, no credentials
                                  (one answer for all, in about the same time)
    unsupported_grant_type   400  a grant other than client_credentials
    invalid_scope            400  a scope the client was not given
    temporarily_unavailable  503  the client register cannot be read, or no answer in 10 s
    server_error             500  the signing keys cannot be read

The HTTP/1.1 server is ``ingest_service.http11`` (h11 on asyncio streams), so the issuer runs
in the gateway's event loop and uses its database pool. Everything is bounded: body size,
header size, connections, time per request, idle keep-alive time, and scrypt hashes computed
at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest_service.config import GatewayConfig
from ingest_service.errors import UnknownTenant
from ingest_service.http11 import HTTP11Server, ListenError, Request, Response, json_response
from ingest_service.tenancy import check_tenant_id

__all__ = [
    "ISSUER_PATHS",
    "ClientCredentials",
    "DevIssuer",
    "DevIssuerError",
    "OAuthClient",
    "SigningKeys",
    "create_client",
    "hash_secret",
    "key_directory",
    "list_clients",
    "revoke_client",
    "rotate_signing_key",
    "verify_secret",
]

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/token"
JWKS_PATH = "/.well-known/jwks.json"
ISSUER_PATHS = (TOKEN_PATH, JWKS_PATH)

_MAX_BODY_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 16 * 1024
_MAX_FIELDS = 32
_MAX_CONNECTIONS = 64
_REQUEST_TIMEOUT_SECONDS = 10.0
# Longer than the local Envoy's idle timeout for this upstream (30 s), so Envoy always closes
# an idle connection first and never sends a request into one being closed here.
_IDLE_TIMEOUT_SECONDS = 75.0
_DATABASE_TIMEOUT_SECONDS = 5.0
_HASHES_AT_ONCE = 4  # each scrypt hash holds 16 MiB
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 §3.3
_DEFAULT_SCOPES = ("api:ingest",)
_REALM = 'Basic realm="welltegra-dev-issuer", charset="UTF-8"'


class DevIssuerError(RuntimeError):
    """The issuer cannot start (its address is in use, its keys cannot be read)."""


class OAuthError(Exception):
    """A refusal answered with an RFC 6749 error body."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


# Client secrets ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_secret(secret: str) -> str:
    """``secret`` as a self-describing scrypt hash with its own salt:
    ``scrypt$N$r$p$<salt>$<hash>`` (base64)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` hashes to ``stored``, compared in constant time. A malformed stored
    hash verifies nothing."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        cost, block, parallel = int(n), int(r), int(p)
        salt_bytes, expected = base64.b64decode(salt), base64.b64decode(digest)
    except ValueError:
        return False
    if scheme != "scrypt" or not 1 < cost <= 2**20 or not 0 < block * parallel <= 64:
        return False
    actual = hashlib.scrypt(
        secret.encode("utf-8", "surrogatepass"),
        salt=salt_bytes,
        n=cost,
        r=block,
        p=parallel,
        maxmem=_SCRYPT_MAXMEM,
        dklen=len(expected),
    )
    return hmac.compare_digest(actual, expected)


# The client register ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """A new client's id and secret; the secret exists only here and is never stored."""

    client_id: str
    client_secret: str
    tenant_id: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """A registered client, as listed."""

    client_id: str
    tenant_id: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


def _check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    for scope in scopes:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise ValueError(f'{scope[:60]!r} is not a scope (printable ASCII, no space, " or \\)')
    return tuple(dict.fromkeys(scopes))


async def create_client(
    pool: asyncpg.Pool, tenant_id: str, scopes: Sequence[str] = _DEFAULT_SCOPES
) -> ClientCredentials:
    """Register a client of ``tenant_id`` with ``scopes``; ``UnknownTenant`` if the tenant was
    never created, ``ValueError`` for a malformed scope."""
    check_tenant_id(tenant_id)
    granted = _check_scopes(scopes)
    if not granted:
        raise ValueError("a client needs at least one scope")
    client_id = secrets.token_hex(16)
    client_secret = secrets.token_urlsafe(32)
    secret_hash = await asyncio.to_thread(hash_secret, client_secret)
    try:
        await pool.execute(
            "INSERT INTO welltegra.oauth_clients (client_id, tenant_id, secret_hash, scopes)"
            " VALUES ($1, $2, $3, $4)",
            client_id,
            tenant_id,
            secret_hash,
            list(granted),
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise UnknownTenant(
            f"tenant {tenant_id!r} does not exist: create it first (tenants create)"
        ) from exc
    return ClientCredentials(client_id, client_secret, tenant_id, granted)


async def revoke_client(pool: asyncpg.Pool, client_id: str) -> bool:
    """Revoke ``client_id``: it gets no new token (tokens already issued live until they
    expire). False if there is no such client, or it was revoked before."""
    revoked = await pool.fetchval(
        "UPDATE welltegra.oauth_clients SET revoked_at = now()"
        " WHERE client_id = $1 AND revoked_at IS NULL RETURNING true",
        client_id,
    )
    return bool(revoked)


async def list_clients(pool: asyncpg.Pool, tenant_id: str | None = None) -> list[OAuthClient]:
    rows = await pool.fetch(
        "SELECT client_id, tenant_id, scopes, created_at, revoked_at"
        " FROM welltegra.oauth_clients WHERE $1::text IS NULL OR tenant_id = $1"
        " ORDER BY tenant_id, created_at",
        tenant_id,
    )
    return [
        OAuthClient(
            client_id=row["client_id"],
            tenant_id=row["tenant_id"],
            scopes=tuple(row["scopes"]),
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
        )
        for row in rows
    ]


# Signing keys -----------------------------------------------------------------------------


def key_directory(data_dir: Path) -> Path:
    """Where the issuer's signing keys live in a data directory."""
    return data_dir / "dev-issuer"


def _kid(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's RFC 7638 JWK thumbprint: stable, and derived from the key alone."""
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey


class SigningKeys:
    """The issuer's ES256 keys in one directory: ``current.pem`` signs, ``previous.pem`` (the
    key before the last rotation) is only published. Reloaded when ``current.pem`` changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._current = directory / "current.pem"
        self._previous = directory / "previous.pem"
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[_SigningKey] = []

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Serialises creation and rotation across processes (serve, the CLI).
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _write(path: Path, pem: bytes) -> None:
        # Written whole under another name, owner-only from the first byte, then renamed into
        # place: a reader sees the old file or the new one, never part of one.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    @staticmethod
    def _new_pem() -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @staticmethod
    def _read(path: Path) -> _SigningKey:
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise DevIssuerError(f"cannot read the signing key {path}: {exc}") from exc
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
            raise DevIssuerError(f"{path} does not hold a P-256 private key")
        return _SigningKey(_kid(loaded.public_key()), loaded)

    def _ensure(self) -> None:
        if self._current.exists():
            return
        with self._locked():
            if not self._current.exists():
                self._write(self._current, self._new_pem())

    def _load(self) -> list[_SigningKey]:
        self._ensure()
        status = os.stat(self._current)
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if stamp != self._stamp:
            keys = [self._read(self._current)]
            if self._previous.exists():
                previous = self._read(self._previous)
                if previous.kid != keys[0].kid:
                    keys.append(previous)
            self._keys, self._stamp = keys, stamp
        return self._keys

    def signing_key(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """The current key and its kid (created on first use)."""
        current = self._load()[0]
        return current.kid, current.private_key

    def jwks(self) -> dict[str, Any]:
        """The public JWK set: the current key, then the previous one."""
        keys = []
        for key in self._load():
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.private_key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": key.kid, "use": "sig", "alg": "ES256"})
        return {"keys": keys}

    def rotate(self) -> str:
        """Make a new current key; the current one becomes the previous (still published), the
        previous one is dropped. Returns the new kid."""
        with self._locked():
            if self._current.exists():
                # previous first: at every instant current.pem exists and both files are whole.
                self._write(self._previous, self._current.read_bytes())
            self._write(self._current, self._new_pem())
        return self.signing_key()[0]


def rotate_signing_key(data_dir: Path) -> str:
    """``welltegra-ingest issuer rotate``: a new signing key in ``data_dir``; returns its kid."""
    return SigningKeys(key_directory(data_dir)).rotate()


# Requests ---------------------------------------------------------------------------------


def _header(request: Request, name: str) -> str | None:
    values = [value for key, value in request.headers if key == name]
    if not values:
        return None
    if len(values) > 1:
        raise OAuthError(400, "invalid_request", f"header {name} sent more than once")
    return values[0]


class _Repeated(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Repeated(key)
        result[key] = value
    return result


def _parameters(content_type: str | None, body: bytes) -> dict[str, str]:
    """The request's parameters, from a form or a JSON object; each at most once."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        if media == "application/x-www-form-urlencoded":
            text = body.decode("utf-8")
            pairs = urllib.parse.parse_qsl(
                text,
                keep_blank_values=True,
                strict_parsing=bool(text),
                errors="strict",
                max_num_fields=_MAX_FIELDS,
            )
            return _json_object([(key, value) for key, value in pairs])
        if media == "application/json":
            loaded = json.loads(body, object_pairs_hook=_json_object)
            if not isinstance(loaded, dict):
                raise OAuthError(400, "invalid_request", "the JSON body must be an object")
            for key, value in loaded.items():
                if not isinstance(value, str):
                    raise OAuthError(400, "invalid_request", f"{key[:60]!r} must be a string")
            return loaded
    except _Repeated as exc:
        raise OAuthError(
            400, "invalid_request", f"parameter {exc.name[:60]!r} is given more than once"
        ) from exc
    except (ValueError, RecursionError) as exc:  # bad JSON, UTF-8 or form encoding
        kind = "JSON" if media == "application/json" else "form data"
        raise OAuthError(400, "invalid_request", f"the body is not valid {kind}") from exc
    raise OAuthError(
        400,
        "invalid_request",
        "send the parameters as application/x-www-form-urlencoded or application/json",
    )


def _credentials(authorization: str | None, parameters: dict[str, str]) -> tuple[str, str]:
    """The client id and secret: HTTP Basic (client_secret_basic) or the body
    (client_secret_post), not both (RFC 6749 §2.3)."""
    if authorization is None:
        client_id, secret = parameters.get("client_id"), parameters.get("client_secret")
        if not client_id or secret is None:
            raise OAuthError(
                401,
                "invalid_client",
                "client authentication is required: HTTP Basic, or client_id and client_secret",
            )
        return client_id, secret
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError(401, "invalid_client", "only HTTP Basic client authentication is known")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise OAuthError(401, "invalid_client", "malformed HTTP Basic credentials") from exc
    raw_id, separator, raw_secret = decoded.partition(":")
    if not separator or not raw_id:
        raise OAuthError(401, "invalid_client", "malformed HTTP Basic credentials")
    # RFC 6749 §2.3.1: both halves are form-urlencoded before they are joined.
    client_id = urllib.parse.unquote_plus(raw_id)
    if "client_secret" in parameters:
        raise OAuthError(
            400, "invalid_request", "use one client authentication method, not Basic and the body"
        )
    if parameters.get("client_id", client_id) != client_id:
        raise OAuthError(400, "invalid_request", "client_id differs from the Basic credentials")
    return client_id, urllib.parse.unquote_plus(raw_secret)


_NO_STORE: tuple[tuple[str, str], ...] = (("cache-control", "no-store"), ("pragma", "no-cache"))


def _error(error: OAuthError) -> Response:
    headers = _NO_STORE
    if error.status == 401:
        headers += (("www-authenticate", _REALM),)
    body = {"error": error.error, "error_description": error.description}
    return json_response(error.status, body, headers)


def _refusal(status: int, reason: str) -> Response:
    """The answer to a request the HTTP server refuses itself, as an RFC 6749 error."""
    error = {500: "server_error", 503: "temporarily_unavailable"}.get(status, "invalid_request")
    return _error(OAuthError(status, error, reason))


# The server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Client:
    client_id: str
    tenant_id: str
    scopes: tuple[str, ...]


class DevIssuer:
    """The issuer's HTTP endpoint, in the calling event loop: ``bind`` (to learn the port),
    then ``start`` with a database pool, then ``stop``."""

    def __init__(self, config: GatewayConfig) -> None:
        self._settings = config.dev_issuer
        self._auth = config.auth
        envoy_port = int(config.envoy.listen.rpartition(":")[2]) if config.envoy else 0
        self._envoy_port = envoy_port
        self.keys = SigningKeys(key_directory(config.data_dir))
        self._pool: asyncpg.Pool | None = None
        self._decoy_hash = ""
        self._hashing = asyncio.Semaphore(_HASHES_AT_ONCE)
        host, _, port = self._settings.listen.rpartition(":")
        self._http = HTTP11Server(
            host.strip("[]") or None,
            int(port),
            self._route,
            max_connections=_MAX_CONNECTIONS,
            read_timeout=_REQUEST_TIMEOUT_SECONDS,
            idle_timeout=_IDLE_TIMEOUT_SECONDS,
            handle_timeout=_REQUEST_TIMEOUT_SECONDS,
            max_header_bytes=_MAX_HEADER_BYTES,
            max_body_bytes=_MAX_BODY_BYTES,
            refuse=_refusal,
        )

    @property
    def port(self) -> int:
        """The port: the configured one, or after ``bind`` the one listened on."""
        return self._http.port

    # Addresses ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Where this process reaches the issuer (loopback when it listens on every address)."""
        host = self._settings.listen.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def jwks_url(self) -> str:
        return self.base_url + JWKS_PATH

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def issuer(self) -> str:
        """The tokens' ``iss``: configured, else the local Envoy's address when it has a fixed
        port, else the issuer's own."""
        if self._settings.issuer_url:
            return self._settings.issuer_url
        if self._envoy_port:
            return f"https://localhost:{self._envoy_port}/"
        return self.base_url + "/"

    def gateway_config(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with ``auth.jwks_url`` and ``auth.issuer`` set to this issuer's where they
        are not configured, so the gateway verifies its tokens like any issuer's."""
        auth = config.auth.model_copy(
            update={
                "jwks_url": config.auth.jwks_url or self.jwks_url,
                "issuer": config.auth.issuer or self.issuer,
            }
        )
        if (auth.jwks_url, auth.issuer) != (self.jwks_url, self.issuer):
            log.warning(
                "the gateway will not accept the development issuer's tokens: it trusts"
                " auth.jwks_url %s and auth.issuer %s",
                auth.jwks_url,
                auth.issuer,
            )
        return config.model_copy(update={"auth": auth})

    # Lifecycle ------------------------------------------------------------------------------

    async def bind(self) -> int:
        """Take the listen address (not serving yet); returns the port. Safe to call again."""
        try:
            return await self._http.bind()
        except ListenError as exc:
            raise DevIssuerError(f"the development issuer {exc}") from exc

    async def start(self, pool: asyncpg.Pool) -> int:
        """Load (or create) the signing key and serve; returns the port. The client table
        comes with the gateway's migrations."""
        self._pool = pool
        self.keys.signing_key()
        # Unknown clients are checked against this, so they cost what a wrong secret costs.
        self._decoy_hash = await asyncio.to_thread(hash_secret, secrets.token_urlsafe(32))
        await self.bind()
        await self._http.start()
        log.info("development OAuth issuer on %s, iss %s", self.base_url, self.issuer)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close open connections. Safe to call at any time."""
        await self._http.stop()

    # HTTP -----------------------------------------------------------------------------------

    async def _route(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path == TOKEN_PATH:
            if method != "POST":
                return _method_not_allowed("POST")
            try:
                return await self._token(request)
            except OAuthError as exc:
                return _error(exc)
            except DevIssuerError as exc:  # a signing key that cannot be read
                log.error("cannot issue a token: %s", exc)
                return _error(OAuthError(500, "server_error", "the issuer cannot sign tokens"))
        if path == JWKS_PATH:
            if method != "GET":
                return _method_not_allowed("GET")
            try:
                return json_response(200, self.keys.jwks(), (("cache-control", "max-age=60"),))
            except DevIssuerError as exc:
                log.error("cannot publish the signing keys: %s", exc)
                return _error(OAuthError(500, "server_error", "the issuer's keys cannot be read"))
        return json_response(
            404,
            {"error": "not_found", "error_description": f"this issuer serves {TOKEN_PATH}"},
        )

    # The token endpoint ---------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        parameters = _parameters(_header(request, "content-type"), request.body)
        grant_type = parameters.get("grant_type")
        if not grant_type:
            raise OAuthError(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise OAuthError(
                400,
                "unsupported_grant_type",
                f"grant_type {grant_type[:60]!r} is not supported; use client_credentials",
            )
        client = await self._authenticate(
            *_credentials(_header(request, "authorization"), parameters)
        )
        audience = parameters.get("audience") or self._auth.audience
        if audience != self._auth.audience:
            raise OAuthError(
                400,
                "invalid_request",
                f"audience {audience[:200]!r} is not served here; use {self._auth.audience!r}",
            )
        scopes = self._granted(client, parameters.get("scope"))
        lifetime = int(self._settings.token_lifetime.total_seconds())
        now = int(time.time())
        kid, key = self.keys.signing_key()
        claims = {
            self._auth.tenant_claim: client.tenant_id,
            "iss": self.issuer,
            "sub": client.client_id,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_urlsafe(16),
            "scope": " ".join(scopes),
            "client_id": client.client_id,
        }
        # typ at+jwt: the JWT access token profile (RFC 9068).
        token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "at+jwt"})
        log.info(
            "issued a token to client %s of tenant %s (kid %s)",
            client.client_id,
            client.tenant_id,
            kid,
        )
        return json_response(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": " ".join(scopes),
            },
            _NO_STORE,
        )

    async def _authenticate(self, client_id: str, secret: str) -> _Client:
        row = None
        if _CLIENT_ID.fullmatch(client_id):
            row = await self._client_row(client_id)
        # A secret is hashed whether or not the client exists, so an unknown client and a
        # wrong secret get the same answer in about the same time.
        stored = row["secret_hash"] if row is not None else self._decoy_hash
        async with self._hashing:
            matches = await asyncio.to_thread(verify_secret, secret, stored)
        if row is None or not matches:
            log.info("client authentication failed for client_id %r", client_id[:64])
            raise OAuthError(401, "invalid_client", "client authentication failed")
        return _Client(client_id, row["tenant_id"], tuple(row["scopes"]))

    async def _client_row(self, client_id: str) -> asyncpg.Record | None:
        assert self._pool is not None, "issuer not started"
        try:
            async with asyncio.timeout(_DATABASE_TIMEOUT_SECONDS):
                row: asyncpg.Record | None = await self._pool.fetchrow(
                    "SELECT tenant_id, secret_hash, scopes FROM welltegra.oauth_clients"
                    " WHERE client_id = $1 AND revoked_at IS NULL",
                    client_id,
                )
                return row
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot read the OAuth client register: %r", exc)
            raise OAuthError(
                503, "temporarily_unavailable", "the client register cannot be read; retry later"
            ) from exc

    @staticmethod
    def _granted(client: _Client, requested: str | None) -> tuple[str, ...]:
        """The scopes to grant: those asked for, each of which the client must have been
        given, or all of the client's when none are asked for (RFC 6749 §3.3)."""
        if not requested or not requested.strip():
            return client.scopes
        asked = tuple(dict.fromkeys(requested.split()))
        refused = [scope for scope in asked if scope not in client.scopes]
        if refused:
            shown = " ".join(scope[:60] for scope in refused[:5])
            raise OAuthError(400, "invalid_scope", f"scope not granted to this client: {shown}")
        return asked


def _method_not_allowed(allowed: str) -> Response:
    return json_response(
        405,
        {"error": "invalid_request", "error_description": f"use {allowed}"},
        (("allow", allowed),),
    )
