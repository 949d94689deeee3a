"""The agent's access tokens: the OAuth 2.0 client-credentials grant (RFC 6749 §4.4), as Auth0,
Keycloak and the project's development issuer serve it.

The request is a form POST of ``grant_type=client_credentials``, ``client_id``,
``client_secret``, ``audience`` and, when configured, ``scope`` (``client_secret_post``: the
one way every one of those issuers accepts). The answer's ``access_token`` is cached and used
until ``refresh_margin`` seconds before it expires (at most half its lifetime before, so a
margin longer than the token's life never means a request per call); concurrent callers share
one request.

Errors::

    TokenError     no token. ``retryable`` is False when the issuer refused the client
                   (invalid_client, unauthorized_client, access_denied, invalid_request, ...:
                   HTTP 400/401/403, or any other 4xx but 429), or answered with a token the
                   agent cannot use (not Bearer); True for a network error, a timeout, HTTP 429
                   or 5xx, or a malformed or oversized answer.

A message names the token URL and the issuer's ``error``/``error_description``, never the
client secret or a token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

__all__ = ["MAX_RESPONSE_BYTES", "TokenClient", "TokenError"]

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
# When an issuer omits expires_in (RFC 6749 only recommends it), the token is assumed to live
# this long: short enough that a token revoked early is replaced soon.
_ASSUMED_LIFETIME = 300.0
# After a failed refresh, while the cached token is still valid, it is used and the next
# attempt waits this long, so an issuer outage does not mean one request per call.
_REFRESH_RETRY_SECONDS = 10.0
# The issuer's text quoted in a message: bounded and on one line.
_MAX_QUOTED = 200
# What the issuer says in a 400/401/403 that trying again may still cure.
_RETRYABLE_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


class TokenError(Exception):
    """No access token could be had. ``retryable`` says whether asking again can help;
    ``retry_after`` is the issuer's ``Retry-After`` in seconds, when it gave one."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after

    def copy(self) -> TokenError:
        """The same error, for another caller (an exception object is not shared by tasks)."""
        return TokenError(str(self), retryable=self.retryable, retry_after=self.retry_after)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown_url(url: str) -> str:
    """``url`` without user information, query or fragment: what a message may show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(min(int(value), 3600))
    return None


class TokenClient:
    """Access tokens of one OAuth 2.0 client, cached until ``refresh_margin`` seconds before
    they expire. ``token()`` may be called from any number of tasks of one event loop."""

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        audience: str,
        scope: str | None = None,
        refresh_margin: float = 300.0,
        timeout: float = 10.0,
        ca_file: Path | None = None,
        on_refresh: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_refresh`` is called after each token fetched (the agent counts them);
        ``clock`` measures token lifetimes (monotonic seconds; tests pass their own)."""
        parts = urllib.parse.urlsplit(token_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"token_url must be an http:// or https:// URL, not {token_url!r}")
        if not client_id:
            raise ValueError("client_id must not be empty")
        if not math.isfinite(refresh_margin) or refresh_margin < 0:
            raise ValueError(f"refresh_margin must be 0 or more seconds, not {refresh_margin}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be more than 0 seconds, not {timeout}")
        self.token_url = token_url
        self.client_id = client_id
        self.audience = audience
        self.scope = scope
        self.refresh_margin = refresh_margin
        self.timeout = timeout
        self._secret = client_secret
        self._shown_url = _shown_url(token_url)
        self._on_refresh = on_refresh
        self._clock = clock
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            log.warning(
                "the token URL %s is plain http to another host: the client secret and the"
                " tokens cross the network in clear text; use https",
                self._shown_url,
            )
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot read the CA file {ca_file}: {exc}") from exc
        self._http = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # a redirect must not carry the secret elsewhere
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
            headers={"accept": "application/json"},
        )
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expires_at: float | None = None
        self._refresh_at = 0.0
        self._completed = 0  # fetches finished: a caller that waited for one shares its end
        self._failure: TokenError | None = None

    def __repr__(self) -> str:
        return (
            f"TokenClient(token_url={self._shown_url!r}, client_id={self.client_id!r},"
            f" audience={self.audience!r}, scope={self.scope!r}, client_secret='***')"
        )

    @property
    def expires_at(self) -> float | None:
        """When the cached token expires, in the clock's seconds (``time.monotonic()`` unless
        another clock was given); None when no token is cached."""
        return self._expires_at if self._token is not None else None

    def invalidate(self) -> None:
        """Forget the cached token (the gateway refused it): the next ``token()`` fetches."""
        self._token = None
        self._expires_at = None
        self._refresh_at = 0.0

    async def aclose(self) -> None:
        """Close the HTTP connections. Safe to call more than once."""
        await self._http.aclose()

    async def token(self) -> str:
        """A valid access token: the cached one, or a new one when it is missing or within
        the refresh margin of its expiry. Raises ``TokenError``."""
        cached = self._fresh()
        if cached is not None:
            return cached
        completed = self._completed
        async with self._lock:
            cached = self._fresh()
            if cached is not None:
                return cached  # another caller fetched it while this one waited
            if self._completed != completed and self._failure is not None:
                raise self._failure.copy()  # the fetch this caller waited for failed
            started = self._clock()
            try:
                token, lifetime = await self._fetch()
            except TokenError as exc:
                self._completed += 1
                self._failure = exc
                now = self._clock()
                if self._token is not None and self._expires_at is not None:
                    if now < self._expires_at:
                        # Still valid: used while the issuer refuses or cannot be reached.
                        log.warning("using the cached access token until it expires: %s", exc)
                        self._refresh_at = min(now + _REFRESH_RETRY_SECONDS, self._expires_at)
                        return self._token
                    self.invalidate()
                raise
            self._completed += 1
            self._failure = None
            margin = min(self.refresh_margin, lifetime / 2)
            # Lifetimes count from when the request was sent: never later than the issuer's.
            self._token = token
            self._expires_at = started + lifetime
            self._refresh_at = started + lifetime - margin
            if self._on_refresh is not None:
                self._on_refresh()
            return token

    def _fresh(self) -> str | None:
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        return None

    def _error(self, what: str, *, retryable: bool, retry_after: float | None = None) -> TokenError:
        message = f"token request to {self._shown_url} failed: {what}"
        return TokenError(self._scrub(message), retryable=retryable, retry_after=retry_after)

    def _scrub(self, text: str) -> str:
        """``text`` on one line, without the secret (an issuer may echo what it was sent)."""
        if self._secret:
            text = text.replace(self._secret, "***")
            text = text.replace(urllib.parse.quote_plus(self._secret), "***")
        return " ".join(text.split())

    def _quote(self, text: str) -> str:
        """The issuer's ``text`` for a message: scrubbed first, then cut short."""
        return self._scrub(text)[:_MAX_QUOTED]

    async def _fetch(self) -> tuple[str, float]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self._secret,
            "audience": self.audience,
        }
        if self.scope:
            form["scope"] = self.scope
        try:
            # The whole exchange is bounded, not only each read: a server that trickles its
            # answer cannot hold the agent.
            async with asyncio.timeout(self.timeout):
                async with self._http.stream("POST", self.token_url, data=form) as response:
                    body = await self._read_capped(response)
        except TimeoutError as exc:
            raise self._error(f"no answer within {self.timeout:g} s", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise self._error(
                f"{type(exc).__name__}: {exc or 'connection failed'}", retryable=True
            ) from exc
        return self._parse(response, body)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise self._oversized(response)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise self._oversized(response)
            chunks.append(chunk)
        return b"".join(chunks)

    def _oversized(self, response: httpx.Response) -> TokenError:
        return self._error(
            f"HTTP {response.status_code} with a body over {MAX_RESPONSE_BYTES} bytes",
            retryable=True,
        )

    def _parse(self, response: httpx.Response, body: bytes) -> tuple[str, float]:
        status = response.status_code
        try:
            parsed: Any = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
        if status != 200:
            raise self._refusal(response, parsed if isinstance(parsed, dict) else None)
        if not isinstance(parsed, dict):
            raise self._error("HTTP 200 without a JSON object", retryable=True)
        token = parsed.get("access_token")
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise self._error("the answer has no access_token", retryable=True)
        token_type = parsed.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            shown = self._quote(str(token_type))
            raise self._error(
                f"the issuer gave a token of type {shown!r}; the gateway takes Bearer tokens",
                retryable=False,
            )
        expires_in = parsed.get("expires_in", _ASSUMED_LIFETIME)
        if isinstance(expires_in, str) and expires_in.strip().isdigit():
            expires_in = int(expires_in)  # some issuers send it as a string
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not math.isfinite(expires_in)
            or expires_in <= 0
        ):
            raise self._error("the answer's expires_in is not a positive number", retryable=True)
        return token, float(expires_in)

    def _refusal(self, response: httpx.Response, body: dict[str, Any] | None) -> TokenError:
        status = response.status_code
        error = body.get("error") if body else None
        description = body.get("error_description") if body else None
        said = f"HTTP {status}"
        if isinstance(error, str) and error:
            said += f" {self._quote(error)}"
            if isinstance(description, str) and description:
                said += f": {self._quote(description)}"
        elif status in (301, 302, 303, 307, 308):
            target = _shown_url(response.headers.get("location", ""))
            said += f" redirect to {target[:_MAX_QUOTED]}; set the token URL to where it points"
        retryable = status == 429 or status >= 500
        if status in (400, 401, 403) and error in _RETRYABLE_ERRORS:
            retryable = True
        if status == 401 and error == "invalid_client":
            said += " (check the client id and secret, and that the client is not revoked)"
        return self._error(said, retryable=retryable, retry_after=_retry_after(response))
