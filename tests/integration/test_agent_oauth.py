"""The agent's token client against the real development issuer (clients in the session's
Postgres) and a real gateway that trusts it: fetching, caching, refreshing, one request for
many callers, every refusal; and, for what no well-behaved issuer does (garbage, huge or
stalled answers, redirects, TLS with a private CA), a small canned HTTP server."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.oauth import MAX_RESPONSE_BYTES, TokenClient, TokenError
from ingest_service.config import AuthConfig, DevIssuerConfig, GatewayConfig
from ingest_service.dev_issuer import ClientCredentials, DevIssuer, create_client, revoke_client
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import AUDIENCE
from .test_ingest import auth, point

LIFETIME = 60.0  # the issuer's shortest token lifetime
ISSUER_LOGGER = "ingest_service.dev_issuer"


# The real issuer and a gateway that trusts it ----------------------------------------------------


@pytest.fixture(scope="module")
async def issuer(
    gateway: Gateway, gateway_config: GatewayConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DevIssuer]:
    """An issuer of one-minute tokens on a free loopback port, clients in the session's
    database."""
    config = gateway_config.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("agent-oauth-issuer"),
            "dev_issuer": DevIssuerConfig(
                enabled=True, listen="127.0.0.1:0", token_lifetime=timedelta(seconds=LIFETIME)
            ),
        }
    )
    dev = DevIssuer(config)
    await dev.start(gateway.storage.pool)
    yield dev
    await dev.stop()


@pytest.fixture(scope="module")
async def issuer_gateway(
    issuer: DevIssuer, gateway_config: GatewayConfig, database_url: str, redis_url: str
) -> AsyncIterator[Gateway]:
    """A gateway that knows the issuer only by its JWKS URL."""
    bare = gateway_config.model_copy(update={"auth": AuthConfig()})
    gw = Gateway(issuer.gateway_config(bare), database_url, redis_url)
    await gw.start()
    yield gw
    await gw.stop(grace=1)


@pytest.fixture
async def client(gateway: Gateway, tenant: str) -> ClientCredentials:
    return await create_client(gateway.storage.pool, tenant)


class Clock:
    """A monotonic clock the test moves: token lifetimes pass without waiting for them."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeClient = Callable[..., TokenClient]


@pytest.fixture
async def make_client(issuer: DevIssuer) -> AsyncIterator[MakeClient]:
    """``make_client(credentials, **options)``: a TokenClient of the issuer, closed after."""
    made: list[TokenClient] = []

    def factory(credentials: ClientCredentials, **options: object) -> TokenClient:
        settings: dict[str, object] = {
            "token_url": issuer.token_url,
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret,
            "audience": AUDIENCE,
            "timeout": 10.0,
            **options,
        }
        tokens = TokenClient(**settings)  # type: ignore[arg-type]
        made.append(tokens)
        return tokens

    yield factory
    for tokens in made:
        await tokens.aclose()


@pytest.fixture
def issuer_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ISSUER_LOGGER)
    return caplog


def issued(caplog: pytest.LogCaptureFixture, client_id: str) -> int:
    """Tokens the issuer says it issued to ``client_id``: requests counted on its side."""
    return sum(
        record.name == ISSUER_LOGGER
        and record.getMessage().startswith(f"issued a token to client {client_id} ")
        for record in caplog.records
    )


def refused(caplog: pytest.LogCaptureFixture, client_id: str) -> int:
    return sum(
        record.name == ISSUER_LOGGER
        and record.getMessage() == f"client authentication failed for client_id {client_id!r}"
        for record in caplog.records
    )


async def ingest(gateway: Gateway, token: str, tenant: str) -> ingest_pb2.IngestRealtimeResponse:
    request = ingest_pb2.IngestRealtimeRequest(tenant_id=tenant, data_points=[point(0)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response: ingest_pb2.IngestRealtimeResponse = await stub.IngestRealtime(
            request, metadata=auth(token), timeout=30
        )
    return response


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# Fetching and caching ---------------------------------------------------------------------------


async def test_a_token_is_fetched_once_and_accepted_by_the_gateway(
    issuer_gateway: Gateway,
    make_client: MakeClient,
    client: ClientCredentials,
    tenant: str,
    issuer_log: pytest.LogCaptureFixture,
) -> None:
    refreshes: list[None] = []
    clock = Clock()
    tokens = make_client(client, on_refresh=lambda: refreshes.append(None), clock=clock)
    assert tokens.expires_at is None

    token = await tokens.token()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["client_id"], claims["tenant_id"], claims["aud"]) == (
        client.client_id,
        tenant,
        AUDIENCE,
    )
    assert tokens.expires_at == pytest.approx(clock.now + LIFETIME)
    for _ in range(5):
        assert await tokens.token() == token
    assert issued(issuer_log, client.client_id) == 1
    assert len(refreshes) == 1

    response = await ingest(issuer_gateway, token, tenant)
    assert (response.status, response.accepted_count, response.tenant_id) == ("success", 1, tenant)


async def test_a_token_is_refreshed_within_the_margin(
    make_client: MakeClient, client: ClientCredentials, issuer_log: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    tokens = make_client(client, refresh_margin=10.0, clock=clock)
    first = await tokens.token()
    clock.advance(LIFETIME - 10.5)  # just outside the margin
    assert await tokens.token() == first
    assert issued(issuer_log, client.client_id) == 1

    clock.advance(1.0)  # within 10 s of the expiry
    second = await tokens.token()
    assert second != first
    assert issued(issuer_log, client.client_id) == 2
    assert tokens.expires_at == pytest.approx(clock.now + LIFETIME)
    assert await tokens.token() == second
    assert issued(issuer_log, client.client_id) == 2


async def test_a_margin_longer_than_the_life_is_capped_at_half_of_it(
    make_client: MakeClient, client: ClientCredentials, issuer_log: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    tokens = make_client(client, refresh_margin=300.0, clock=clock)  # the default; tokens last 60 s
    first = await tokens.token()
    for _ in range(3):
        clock.advance(9.0)
        assert await tokens.token() == first  # not a request per call
    assert issued(issuer_log, client.client_id) == 1
    clock.advance(LIFETIME / 2 - 27 + 0.5)  # past half the lifetime
    assert await tokens.token() != first
    assert issued(issuer_log, client.client_id) == 2


async def test_invalidate_forgets_the_token(
    make_client: MakeClient, client: ClientCredentials, issuer_log: pytest.LogCaptureFixture
) -> None:
    tokens = make_client(client)
    first = await tokens.token()
    tokens.invalidate()
    assert tokens.expires_at is None
    assert await tokens.token() != first
    assert issued(issuer_log, client.client_id) == 2


async def test_concurrent_callers_share_one_fetch(
    make_client: MakeClient, client: ClientCredentials, issuer_log: pytest.LogCaptureFixture
) -> None:
    refreshes: list[None] = []
    tokens = make_client(client, on_refresh=lambda: refreshes.append(None))
    answers = await asyncio.gather(*(tokens.token() for _ in range(20)))
    assert len(set(answers)) == 1
    assert issued(issuer_log, client.client_id) == 1
    tokens.invalidate()
    again = await asyncio.gather(*(tokens.token() for _ in range(20)))
    assert len(set(again)) == 1 and again[0] != answers[0]
    assert issued(issuer_log, client.client_id) == 2
    assert len(refreshes) == 2


async def test_concurrent_callers_share_one_refusal(
    make_client: MakeClient, client: ClientCredentials, issuer_log: pytest.LogCaptureFixture
) -> None:
    tokens = make_client(client, client_secret="wrong-" + client.client_secret)
    results = await asyncio.gather(*(tokens.token() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(result, TokenError) for result in results)
    assert refused(issuer_log, client.client_id) == 1  # one request for the ten


# Refusals -----------------------------------------------------------------------------------------


def assert_permanent(error: TokenError, url: str, issuer_error: str, *secrets: str) -> None:
    message = str(error)
    assert not error.retryable
    assert "\n" not in message
    assert message.startswith(f"token request to {url} failed: ")
    assert issuer_error in message
    for secret in secrets:
        assert secret not in message


async def test_a_wrong_secret_is_a_permanent_error_without_the_secret(
    issuer: DevIssuer, make_client: MakeClient, client: ClientCredentials
) -> None:
    wrong = "wrong-secret-" + client.client_secret[:10]
    tokens = make_client(client, client_secret=wrong)
    with pytest.raises(TokenError) as caught:
        await tokens.token()
    assert_permanent(
        caught.value, issuer.token_url, "HTTP 401 invalid_client", wrong, client.client_secret
    )
    assert "client authentication failed" in str(caught.value)  # the issuer's description
    assert wrong not in repr(tokens) and "***" in repr(tokens)
    assert tokens.expires_at is None


async def test_a_revoked_client_is_refused_but_its_valid_token_is_used_until_it_expires(
    issuer: DevIssuer,
    gateway: Gateway,
    make_client: MakeClient,
    client: ClientCredentials,
    issuer_log: pytest.LogCaptureFixture,
) -> None:
    fresh = await create_client(gateway.storage.pool, client.tenant_id)
    assert await revoke_client(gateway.storage.pool, fresh.client_id)
    with pytest.raises(TokenError) as caught:
        await make_client(fresh).token()
    assert_permanent(caught.value, issuer.token_url, "invalid_client", fresh.client_secret)

    clock = Clock()
    tokens = make_client(client, refresh_margin=20.0, clock=clock)
    token = await tokens.token()
    assert await revoke_client(gateway.storage.pool, client.client_id)
    clock.advance(LIFETIME - 15)  # within the margin: a refresh is tried, refused
    assert await tokens.token() == token  # still valid: used while it lasts
    assert refused(issuer_log, client.client_id) == 1
    assert await tokens.token() == token  # no new request right after a failed one
    assert refused(issuer_log, client.client_id) == 1
    clock.advance(13)  # 2 s before the expiry: tried again, refused again
    assert await tokens.token() == token
    assert refused(issuer_log, client.client_id) == 2
    clock.advance(2.5)  # expired: never handed out, though the retry pause has not passed
    with pytest.raises(TokenError) as expired:
        await tokens.token()
    assert_permanent(expired.value, issuer.token_url, "invalid_client", client.client_secret)
    assert tokens.expires_at is None


@pytest.mark.parametrize(
    ("options", "issuer_error"),
    [
        ({"audience": "https://elsewhere.example"}, "HTTP 400 invalid_request"),
        ({"scope": "api:admin"}, "HTTP 400 invalid_scope"),
    ],
)
async def test_other_refusals_are_permanent(
    issuer: DevIssuer,
    make_client: MakeClient,
    client: ClientCredentials,
    options: dict[str, str],
    issuer_error: str,
) -> None:
    with pytest.raises(TokenError) as caught:
        await make_client(client, **options).token()
    assert_permanent(caught.value, issuer.token_url, issuer_error, client.client_secret)


async def test_a_scope_the_client_has_is_granted(
    make_client: MakeClient, client: ClientCredentials
) -> None:
    token = await make_client(client, scope="api:ingest").token()
    assert jwt.decode(token, options={"verify_signature": False})["scope"] == "api:ingest"


async def test_an_unreachable_issuer_is_a_retryable_error(client: ClientCredentials) -> None:
    url = f"http://127.0.0.1:{free_port()}/oauth/token"
    tokens = TokenClient(
        token_url=url,
        client_id=client.client_id,
        client_secret=client.client_secret,
        audience=AUDIENCE,
        timeout=5,
    )
    try:
        with pytest.raises(TokenError) as caught:
            await tokens.token()
    finally:
        await tokens.aclose()
    assert caught.value.retryable
    assert str(caught.value).startswith(f"token request to {url} failed: ConnectError")
    assert client.client_secret not in str(caught.value)


# Configuration ------------------------------------------------------------------------------------


def test_plain_http_to_another_host_is_allowed_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge.oauth")

    def warnings_for(url: str) -> list[str]:
        caplog.clear()
        TokenClient(token_url=url, client_id="agent", client_secret="s3cret!", audience=AUDIENCE)
        return [r.getMessage() for r in caplog.records if r.name == "edge.oauth"]

    (warning,) = warnings_for("http://id.example.test/oauth/token")
    assert "clear text" in warning and "http://id.example.test/oauth/token" in warning
    assert "s3cret!" not in warning
    for quiet in (
        "http://127.0.0.1:8081/oauth/token",
        "http://localhost/oauth/token",
        "http://[::1]:8081/oauth/token",
        "https://id.example.test/oauth/token",
    ):
        assert warnings_for(quiet) == [], quiet


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"token_url": "ftp://id.example.test/token"}, "token_url"),
        ({"token_url": "not a url"}, "token_url"),
        ({"refresh_margin": -1.0}, "refresh_margin"),
        ({"timeout": 0.0}, "timeout"),
        ({"ca_file": Path("/nonexistent/ca.pem")}, "CA file"),
    ],
)
def test_bad_settings_fail_at_construction(options: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {
        "token_url": "https://id.example.test/oauth/token",
        "client_id": "agent",
        "client_secret": "s3cret!",
        "audience": AUDIENCE,
        **options,
    }
    with pytest.raises(ValueError, match=message):
        TokenClient(**settings)  # type: ignore[arg-type]


def test_repr_shows_no_secret() -> None:
    tokens = TokenClient(
        token_url="https://user:pw@id.example.test/oauth/token?k=v",
        client_id="agent",
        client_secret="s3cret!",
        audience=AUDIENCE,
    )
    shown = repr(tokens)
    assert "s3cret!" not in shown and "pw" not in shown and "k=v" not in shown
    assert "https://id.example.test/oauth/token" in shown and "agent" in shown


# Answers no good issuer gives: a canned server ----------------------------------------------------

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bytes | None]]


class CannedIssuer:
    """An HTTP/1.1 server that answers each request with what ``reply`` makes of its body
    (None: never answer), counting requests."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.reply: Reply = _answer(200, {})
        self.requests: list[bytes] = []
        self._context = context
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", 0, ssl=self._context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append(body)
                answer = await self.reply(body, writer)
                if answer is None:
                    await asyncio.sleep(3600)
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()


def _response(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _answer(status: int, body: object, *headers: tuple[str, str]) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def reply(_request: bytes, _writer: asyncio.StreamWriter) -> bytes:
        return _response(status, data, (("content-type", "application/json"), *headers))

    return reply


GOOD = {"access_token": "eyJ.canned.token", "token_type": "Bearer", "expires_in": 120}


async def _echo_secret(request: bytes, _writer: asyncio.StreamWriter) -> bytes:
    """A 401 that quotes the request, secret included."""
    quoted = {"error": "invalid_client", "error_description": f"bad request {request.decode()}"}
    return _response(401, json.dumps(quoted).encode())


async def _chunked_flood(_request: bytes, _writer: asyncio.StreamWriter) -> bytes:
    chunk = b"a" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(16)) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body


async def _stall(_request: bytes, _writer: asyncio.StreamWriter) -> None:
    return None


async def _trickle(_request: bytes, writer: asyncio.StreamWriter) -> None:
    """A byte every 50 ms: each read is quick, the whole answer takes a minute."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1200\r\n\r\n")
    for _ in range(1200):
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.05)
    return None


@pytest.fixture
async def canned() -> AsyncIterator[CannedIssuer]:
    server = CannedIssuer()
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("reply", "retryable", "said"),
    [
        (
            _answer(503, {"error": "temporarily_unavailable", "error_description": "db down"}),
            True,
            "HTTP 503 temporarily_unavailable: db down",
        ),
        (_answer(429, b"slow down", ("retry-after", "7")), True, "HTTP 429"),
        (_answer(500, b"<html>oops</html>"), True, "HTTP 500"),
        (_answer(200, b"<html>a captive portal</html>"), True, "without a JSON object"),
        (_answer(200, [GOOD]), True, "without a JSON object"),
        (_answer(200, {**GOOD, "access_token": ""}), True, "no access_token"),
        (_answer(200, {**GOOD, "expires_in": -5}), True, "expires_in"),
        (_answer(200, {**GOOD, "expires_in": "soon"}), True, "expires_in"),
        (_answer(200, {**GOOD, "token_type": "mac"}), False, "type 'mac'"),
        (_answer(200, {k: v for k, v in GOOD.items() if k != "token_type"}), False, "type"),
        (_answer(200, b"x" * (MAX_RESPONSE_BYTES + 1)), True, f"over {MAX_RESPONSE_BYTES}"),
        (_chunked_flood, True, f"over {MAX_RESPONSE_BYTES} bytes"),
        (_answer(404, b"no such page"), False, "HTTP 404"),
        (
            _answer(302, b"", ("location", "https://elsewhere.example.test/token?x=1")),
            False,
            "HTTP 302 redirect to https://elsewhere.example.test/token;",
        ),
        (_answer(403, {"error": "access_denied"}), False, "HTTP 403 access_denied"),
        (_answer(401, {"error": "unauthorized_client"}), False, "HTTP 401 unauthorized_client"),
        (_echo_secret, False, "HTTP 401 invalid_client: bad request"),
    ],
)
async def test_answers_no_good_issuer_gives(
    canned: CannedIssuer, reply: Reply, retryable: bool, said: str
) -> None:
    canned.reply = reply
    url = f"http://127.0.0.1:{canned.port}/oauth/token"
    secret = "n0t/so+secret=&really"  # changed by form encoding: both forms must stay hidden
    tokens = TokenClient(token_url=url, client_id="agent", client_secret=secret, audience=AUDIENCE)
    try:
        with pytest.raises(TokenError) as caught:
            await tokens.token()
    finally:
        await tokens.aclose()
    message = str(caught.value)
    assert caught.value.retryable is retryable, message
    assert message.startswith(f"token request to {url} failed: "), message
    assert said in message, message
    assert secret not in message and "n0t%2Fso%2Bsecret%3D%26really" not in message
    assert "\n" not in message and len(message) < 700
    assert len(canned.requests) == 1  # no redirect followed, no retry here


async def test_retry_after_is_passed_on(canned: CannedIssuer) -> None:
    canned.reply = _answer(503, b"", ("retry-after", "7"))
    tokens = TokenClient(
        token_url=f"http://127.0.0.1:{canned.port}/t", client_id="a", client_secret="s", audience=""
    )
    try:
        with pytest.raises(TokenError) as caught:
            await tokens.token()
    finally:
        await tokens.aclose()
    assert caught.value.retryable and caught.value.retry_after == 7


@pytest.mark.parametrize("reply", [_stall, _trickle])
async def test_a_stalled_issuer_times_out(canned: CannedIssuer, reply: Reply) -> None:
    canned.reply = reply
    tokens = TokenClient(
        token_url=f"http://127.0.0.1:{canned.port}/oauth/token",
        client_id="agent",
        client_secret="s3cret!",
        audience=AUDIENCE,
        timeout=0.5,
    )
    started = time.monotonic()
    try:
        with pytest.raises(TokenError, match=r"no answer within 0\.5 s") as caught:
            await tokens.token()
    finally:
        await tokens.aclose()
    assert caught.value.retryable
    assert time.monotonic() - started < 3


async def test_lenient_but_usable_answers(canned: CannedIssuer) -> None:
    """What Auth0-like issuers vary in: the case of Bearer, expires_in as text or missing, and
    the form that was sent."""
    clock = Clock()
    tokens = TokenClient(
        token_url=f"http://127.0.0.1:{canned.port}/oauth/token",
        client_id="agent-1",
        client_secret="s3cret!",
        audience=AUDIENCE,
        scope="api:ingest api:read",
        refresh_margin=30,
        clock=clock,
    )
    try:
        canned.reply = _answer(200, {**GOOD, "token_type": "bearer", "expires_in": "120"})
        assert await tokens.token() == GOOD["access_token"]
        assert tokens.expires_at == pytest.approx(clock.now + 120)
        canned.reply = _answer(200, {"access_token": "second", "token_type": "BEARER"})
        clock.advance(91)
        assert await tokens.token() == "second"
        assert tokens.expires_at == pytest.approx(clock.now + 300)  # assumed when not given
    finally:
        await tokens.aclose()
    form = parse_qs(canned.requests[0].decode(), strict_parsing=True)
    assert form == {
        "grant_type": ["client_credentials"],
        "client_id": ["agent-1"],
        "client_secret": ["s3cret!"],
        "audience": [AUDIENCE],
        "scope": ["api:ingest api:read"],
    }


# TLS with a private CA ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-oauth test issuer")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("private-ca")
    cert_file, key_file = directory / "issuer.pem", directory / "issuer.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    yield cert_file, key_file


async def test_tls_is_verified_against_the_ca_file(private_ca: tuple[Path, Path]) -> None:
    cert_file, key_file = private_ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    server = CannedIssuer(context)
    server.reply = _answer(200, GOOD)
    await server.start()
    url = f"https://127.0.0.1:{server.port}/oauth/token"
    trusting = TokenClient(
        token_url=url, client_id="a", client_secret="s", audience=AUDIENCE, ca_file=cert_file
    )
    default = TokenClient(token_url=url, client_id="a", client_secret="s", audience=AUDIENCE)
    try:
        assert await trusting.token() == GOOD["access_token"]
        with pytest.raises(TokenError) as caught:
            await default.token()
        assert caught.value.retryable
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert len(server.requests) == 1  # nothing was sent without verification
    finally:
        await trusting.aclose()
        await default.aclose()
        await server.stop()
