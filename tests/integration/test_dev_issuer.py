"""The development OAuth issuer against real Postgres: the token endpoint (form, JSON, HTTP
Basic), every RFC 6749 refusal, a real gateway that knows the issuer only by its JWKS URL,
signing-key rotation without restart, the CLI, and the whole path through Envoy over TLS 1.3."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import yaml

from ingest_service.auth import TokenVerifier
from ingest_service.config import (
    AuthConfig,
    ConfigError,
    DevIssuerConfig,
    GatewayConfig,
    load_config,
)
from ingest_service.dev_issuer import (
    ClientCredentials,
    DevIssuer,
    create_client,
    key_directory,
    revoke_client,
    rotate_signing_key,
)
from ingest_service.envoy_front import DEV_ISSUER_CLUSTER, ENVOY_DIR, EnvoyFront, render_config
from ingest_service.errors import InvalidToken
from ingest_service.server import Gateway
from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ..conftest import AUDIENCE
from .test_envoy_config import load_template, validate
from .test_ingest import auth, point

ISSUER_URL = "https://localhost:8443/"
TOKEN = "/oauth/token"
JWKS = "/.well-known/jwks.json"
CLI = [sys.executable, "-m", "ingest_service.cli"]


@pytest.fixture(scope="module")
async def issuer(
    gateway: Gateway, gateway_config: GatewayConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DevIssuer]:
    """An issuer on a free loopback port, with its clients in the session's database."""
    config = gateway_config.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("issuer"),
            "dev_issuer": DevIssuerConfig(
                enabled=True, listen="127.0.0.1:0", issuer_url=ISSUER_URL
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
    """A second gateway that trusts nothing but the issuer's JWKS URL, as `serve --dev-issuer`
    configures it."""
    bare = gateway_config.model_copy(
        update={"auth": AuthConfig(jwks_refresh_cooldown=timedelta(milliseconds=100))}
    )
    config = issuer.gateway_config(bare)
    assert config.auth.jwks_url == issuer.jwks_url and not config.auth.public_key_files
    assert config.issuer == ISSUER_URL
    gw = Gateway(config, database_url, redis_url)
    await gw.start()
    yield gw
    await gw.stop(grace=1)


@pytest.fixture
async def http(issuer: DevIssuer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=issuer.base_url, timeout=30) as client:
        yield client


@pytest.fixture
async def client(gateway: Gateway, tenant: str) -> ClientCredentials:
    """A client of the test's tenant (deleted with the tenant)."""
    return await create_client(gateway.storage.pool, tenant)


def form(client: ClientCredentials, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "audience": AUDIENCE,
        **extra,
    }


def basic(client_id: str, secret: str) -> dict[str, str]:
    pair = f"{client_id}:{secret}".encode()
    return {"authorization": "Basic " + base64.b64encode(pair).decode()}


async def token_of(http: httpx.AsyncClient, client: ClientCredentials, **extra: str) -> str:
    response = await http.post(TOKEN, data=form(client, **extra))
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def ingest(gateway: Gateway, token: str, tenant: str) -> ingest_pb2.IngestRealtimeResponse:
    request = ingest_pb2.IngestRealtimeRequest(tenant_id=tenant, data_points=[point(0)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response: ingest_pb2.IngestRealtimeResponse = await stub.IngestRealtime(
            request, metadata=auth(token), timeout=30
        )
    return response


def assert_oauth_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]


# The token endpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["form", "json", "basic"])
async def test_a_token_for_every_way_to_send_the_credentials(
    http: httpx.AsyncClient, client: ClientCredentials, tenant: str, style: str
) -> None:
    if style == "form":
        response = await http.post(TOKEN, data=form(client))
    elif style == "json":
        response = await http.post(TOKEN, json=form(client))
    else:
        response = await http.post(
            TOKEN,
            data={"grant_type": "client_credentials", "audience": AUDIENCE},
            headers=basic(client.client_id, client.client_secret),
        )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, "api:ingest")

    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["typ"]) == ("ES256", "at+jwt")
    keys = jwt.PyJWKSet.from_dict((await http.get(JWKS)).json())
    claims = jwt.decode(
        token, keys[header["kid"]].key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER_URL
    )
    assert claims["sub"] == claims["client_id"] == client.client_id
    assert claims["tenant_id"] == tenant
    assert claims["scope"] == "api:ingest"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - time.time()) < 60
    assert len(claims["jti"]) >= 16
    again = jwt.decode(await token_of(http, client), options={"verify_signature": False})
    assert again["jti"] != claims["jti"]


async def test_a_client_asks_for_a_subset_of_its_scopes(
    gateway: Gateway, issuer_gateway: Gateway, http: httpx.AsyncClient, tenant: str
) -> None:
    reader = await create_client(gateway.storage.pool, tenant, ["api:ingest", "api:read"])
    response = await http.post(TOKEN, json=form(reader, scope="api:read"))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "api:read"
    # A real token, but without api:ingest: the gateway refuses it as such.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ingest(issuer_gateway, response.json()["access_token"], tenant)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    everything = await token_of(http, reader)
    assert jwt.decode(everything, options={"verify_signature": False})["scope"] == (
        "api:ingest api:read"
    )


async def test_unknown_client_and_wrong_secret_get_one_answer(
    gateway: Gateway, http: httpx.AsyncClient, client: ClientCredentials, tenant: str
) -> None:
    revoked = await create_client(gateway.storage.pool, tenant)
    assert await revoke_client(gateway.storage.pool, revoked.client_id)
    attempts = {
        "wrong secret": await http.post(TOKEN, data=form(client, client_secret="x" * 43)),
        "unknown client": await http.post(TOKEN, data=form(client, client_id="a" * 32)),
        "malformed client id": await http.post(TOKEN, data=form(client, client_id="é")),
        "revoked client": await http.post(TOKEN, data=form(revoked)),
        "wrong secret, Basic": await http.post(
            TOKEN,
            data={"grant_type": "client_credentials"},
            headers=basic(client.client_id, "nope"),
        ),
    }
    bodies = set()
    for name, response in attempts.items():
        assert_oauth_error(response, 401, "invalid_client")
        assert response.headers["www-authenticate"].startswith("Basic "), name
        bodies.add(response.content)
    assert len(bodies) == 1  # nothing tells an unknown client from a wrong secret
    no_credentials = await http.post(TOKEN, data={"grant_type": "client_credentials"})
    assert_oauth_error(no_credentials, 401, "invalid_client")
    bearer = await http.post(
        TOKEN, data={"grant_type": "client_credentials"}, headers={"authorization": "Bearer x"}
    )
    assert_oauth_error(bearer, 401, "invalid_client")


async def test_unknown_client_and_wrong_secret_take_about_as_long(
    http: httpx.AsyncClient, client: ClientCredentials
) -> None:
    unknown, wrong = [], []
    for _ in range(7):
        for sample, data in (
            (unknown, form(client, client_id="b" * 32)),
            (wrong, form(client, client_secret="y" * 43)),
        ):
            started = time.perf_counter()
            response = await http.post(TOKEN, data=data)
            sample.append(time.perf_counter() - started)
            assert response.status_code == 401
    # Both are dominated by one scrypt hash; without the decoy an unknown client would answer
    # in a fraction of the time.
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 < ratio < 2, (unknown, wrong)


def chunks(size: int) -> Any:
    async def generate() -> AsyncIterator[bytes]:
        for _ in range(size // 4096 + 1):
            yield b"a" * 4096

    return generate()


REFUSALS: list[tuple[str, dict[str, Any], int, str]] = [
    ("other audience", {"data": {"audience": "https://other.example/"}}, 400, "invalid_request"),
    ("grant password", {"data": {"grant_type": "password"}}, 400, "unsupported_grant_type"),
    ("no grant_type", {"data": {"grant_type": ""}}, 400, "invalid_request"),
    ("scope not granted", {"data": {"scope": "api:ingest api:admin"}}, 400, "invalid_scope"),
    ("malformed JSON", {"content": b'{"grant_type": ', "json": True}, 400, "invalid_request"),
    ("JSON array", {"content": b"[]", "json": True}, 400, "invalid_request"),
    ("JSON number", {"content": b'{"grant_type": 1}', "json": True}, 400, "invalid_request"),
    (
        "JSON repeated key",
        {"content": b'{"grant_type": "client_credentials", "grant_type": "x"}', "json": True},
        400,
        "invalid_request",
    ),
    ("JSON not UTF-8", {"content": b'{"a": "\xff"}', "json": True}, 400, "invalid_request"),
    ("malformed form", {"content": b"grant_type=client_credentials&oops"}, 400, "invalid_request"),
    (
        "repeated form parameter",
        {"content": b"grant_type=client_credentials&grant_type=client_credentials"},
        400,
        "invalid_request",
    ),
    ("text/plain", {"content": b"grant_type", "type": "text/plain"}, 400, "invalid_request"),
    ("Basic and body secret", {"data": {}, "basic": True}, 400, "invalid_request"),
    ("64 KiB + 1", {"content": b"a" * (64 * 1024 + 1)}, 413, "invalid_request"),
    ("chunked, too large", {"content": "chunked"}, 413, "invalid_request"),
]


@pytest.mark.parametrize(
    ("request_", "status", "error"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_refusals_are_rfc_6749_errors(
    http: httpx.AsyncClient,
    client: ClientCredentials,
    request_: dict[str, Any],
    status: int,
    error: str,
) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if request_.get("json"):
        headers["content-type"] = "application/json"
    if "type" in request_:
        headers["content-type"] = request_["type"]
    if request_.get("basic"):
        headers |= basic(client.client_id, client.client_secret)
    if "data" in request_:
        response = await http.post(TOKEN, data=form(client, **request_["data"]), headers=headers)
    elif request_["content"] == "chunked":
        response = await http.post(TOKEN, content=chunks(70 * 1024), headers=headers)
    else:
        response = await http.post(TOKEN, content=request_["content"], headers=headers)
    assert_oauth_error(response, status, error)


async def test_other_paths_methods_and_broken_http(
    issuer: DevIssuer, http: httpx.AsyncClient
) -> None:
    assert (await http.get(TOKEN)).status_code == 405
    assert (await http.get(TOKEN)).headers["allow"] == "POST"
    assert (await http.post(JWKS)).status_code == 405
    assert (await http.get("/admin")).status_code == 404
    # Several requests on one kept-alive connection.
    for _ in range(3):
        assert (await http.get(JWKS)).status_code == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", issuer.port)
    try:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_curl_waiting_for_100_continue(issuer: DevIssuer, client: ClientCredentials) -> None:
    padding = "x" * 4000  # an unknown parameter, ignored; makes curl ask before sending
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-H",
        "expect: 100-continue",
        "--expect100-timeout",
        "30",
        "--data-urlencode",
        f"padding={padding}",
        "-u",
        f"{client.client_id}:{client.client_secret}",
        "-d",
        "grant_type=client_credentials",
        issuer.token_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    started = time.perf_counter()
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr
    assert time.perf_counter() - started < 10  # answered 100, not waited out
    assert json.loads(stdout)["token_type"] == "Bearer"


# The gateway trusts the issuer through its JWKS URL ------------------------------------------


async def test_the_gateway_accepts_the_issuers_tokens(
    issuer_gateway: Gateway, http: httpx.AsyncClient, client: ClientCredentials, tenant: str
) -> None:
    token = await token_of(http, client)
    response = await ingest(issuer_gateway, token, tenant)
    assert (response.status, response.accepted_count, response.tenant_id) == ("success", 1, tenant)
    # Another tenant's client cannot write here: the tenant comes from the token.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ingest(issuer_gateway, token, "operator_other")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_rotation_reaches_the_running_gateway(
    issuer: DevIssuer,
    issuer_gateway: Gateway,
    http: httpx.AsyncClient,
    client: ClientCredentials,
    tenant: str,
) -> None:
    old = await token_of(http, client)
    old_kid = jwt.get_unverified_header(old)["kid"]
    assert (await ingest(issuer_gateway, old, tenant)).accepted_count == 1

    new_kid = await asyncio.to_thread(rotate_signing_key, issuer.keys.directory.parent)
    assert new_kid != old_kid
    assert [key["kid"] for key in (await http.get(JWKS)).json()["keys"]] == [new_kid, old_kid]
    await asyncio.sleep(0.2)  # past the gateway's refresh cooldown (100 ms here)
    new = await token_of(http, client)
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert (await ingest(issuer_gateway, new, tenant)).status == "success"
    assert (await ingest(issuer_gateway, old, tenant)).status == "success"

    # One more rotation and the oldest key is gone from the set: a verifier that reads the set
    # now refuses tokens signed with it.
    newest_kid = await asyncio.to_thread(rotate_signing_key, issuer.keys.directory.parent)
    assert [key["kid"] for key in (await http.get(JWKS)).json()["keys"]] == [newest_kid, new_kid]
    fresh = TokenVerifier(AuthConfig(jwks_url=issuer.jwks_url, audience=AUDIENCE), ISSUER_URL)
    assert (await fresh.verify(new)).tenant_id == tenant
    with pytest.raises(InvalidToken, match="no key found"):
        await fresh.verify(old)


def test_signing_keys_are_private_and_survive_a_restart(tmp_path: Path) -> None:
    first = rotate_signing_key(tmp_path)
    directory = key_directory(tmp_path)
    assert (directory / "current.pem").stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    second = rotate_signing_key(tmp_path)
    assert (directory / "previous.pem").stat().st_mode & 0o777 == 0o600
    assert first != second
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp"))


def test_settings_are_checked_when_the_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("dev_issuer:\n  listen: '8081'\n  token_lifetime: 0s\n  issuer: x\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    for problem in (
        "dev_issuer.listen: Value error, '8081' is not HOST:PORT",
        "dev_issuer.token_lifetime: Input should be greater than or equal to",
        "dev_issuer.issuer: Extra inputs are not permitted",
    ):
        assert f"{path}: {problem}" in str(error.value)
    # The issuer supplies the key and the issuer serve needs; nothing else does.
    enabled = load_config(overrides={"dev_issuer": {"enabled": True}}, environ={})
    assert enabled.token_key_problem() is None and enabled.issuer is None
    assert "no key" in (load_config(environ={}).token_key_problem() or "")


# The CLI -------------------------------------------------------------------------------------


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


@pytest.fixture
def cli_env(database_url: str, redis_url: str, master_key_file: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "WELLTEGRA_MASTER_KEY": master_key_file.read_text().strip(),
    }


async def test_clients_and_issuer_commands(
    http: httpx.AsyncClient, tenant: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    status, out, err = await run_cli(
        "clients", "create", "--tenant", tenant, "--scope", "api:ingest", env=cli_env
    )
    assert status == 0, err
    found = dict(re.findall(r"^(client_id|client_secret): (\S+)$", out, re.MULTILINE))
    assert "shown this once only" in err
    created = ClientCredentials(found["client_id"], found["client_secret"], tenant, ())
    assert (await http.post(TOKEN, data=form(created))).status_code == 200

    status, out, err = await run_cli("clients", "list", "--tenant", tenant, env=cli_env)
    assert status == 0, err
    assert f"{created.client_id} {tenant} api:ingest" in out
    assert created.client_secret not in out

    status, out, err = await run_cli("clients", "revoke", created.client_id, env=cli_env)
    assert (status, out.strip()) == (0, f"client {created.client_id} revoked"), err
    assert_oauth_error(await http.post(TOKEN, data=form(created)), 401, "invalid_client")

    status, _, err = await run_cli("clients", "create", "--tenant", "no_such_tenant", env=cli_env)
    assert status == 2 and err.startswith("welltegra-ingest: error: tenant 'no_such_tenant'")
    status, _, err = await run_cli(
        "clients", "create", "--tenant", tenant, "--scope", 'a"b', env=cli_env
    )
    assert status == 2 and "--scope" in err

    status, out, err = await run_cli("issuer", "rotate", "--data-dir", str(tmp_path), env=cli_env)
    assert status == 0, err
    assert re.fullmatch(r"new signing key [A-Za-z0-9_-]{43}; .*\n", out)


async def test_serve_with_dev_issuer(
    gateway: Gateway, tenant: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """`serve --dev-issuer`: a gateway that trusts the issuer beside it, and only it."""
    reader = await create_client(gateway.storage.pool, tenant)
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--dev-issuer-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        env=cli_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    http = httpx.AsyncClient(timeout=30)
    try:
        assert process.stdout is not None
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
            for _ in range(2)
        ]
        grpc_address = re.search(r"serving gRPC on (\S+)", lines[0])
        issuer_address = re.search(r"OAuth issuer on (\S+) \(iss (\S+)\)", lines[1])
        assert grpc_address and issuer_address, lines
        base_url, iss = issuer_address.groups()
        assert iss == base_url + "/"
        response = await http.post(base_url + TOKEN, data=form(reader))
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        assert jwt.decode(token, options={"verify_signature": False})["iss"] == iss
        request = ingest_pb2.IngestRealtimeRequest(data_points=[point(1)])
        async with grpc.aio.insecure_channel(grpc_address.group(1)) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            answer = await stub.IngestRealtime(request, metadata=auth(token), timeout=30)
        assert answer.accepted_count == 1
    finally:
        # Stopped with the client's keep-alive connection still open: it is closed quietly.
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        await http.aclose()
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and b" ERROR " not in stderr, stderr.decode()


# Behind Envoy --------------------------------------------------------------------------------


def test_envoy_routes_the_issuer_only_when_asked(tmp_path: Path) -> None:
    from ingest_service.devkeys import ensure_dev_certificate
    from ingest_service.envoy_front import DESCRIPTOR

    cert, key = ensure_dev_certificate(tmp_path)
    common: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "cert_file": cert,
        "key_file": key,
        "upstream_host": "127.0.0.1",
        "upstream_port": 50051,
        "lua_file": ENVOY_DIR / "error_body.lua",
        "descriptor": DESCRIPTOR,
    }
    with_issuer = render_config(load_template(), issuer_port=8081, **common)
    without = render_config(load_template(), **common)

    def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        found: list[dict[str, Any]] = manager["typed_config"]["route_config"]["virtual_hosts"][0][
            "routes"
        ]
        return found

    assert [r["match"] for r in routes(with_issuer)[:2]] == [{"path": TOKEN}, {"path": JWKS}]
    assert routes(with_issuer)[2:] == routes(without)
    clusters = [c["name"] for c in with_issuer["static_resources"]["clusters"]]
    assert clusters == ["ingest_gateway", DEV_ISSUER_CLUSTER]
    assert DEV_ISSUER_CLUSTER not in str(without) and TOKEN not in str(without)
    assert TOKEN not in (ENVOY_DIR / "envoy.yaml").read_text()
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(with_issuer))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_through_envoy_over_tls_1_3(
    issuer: DevIssuer,
    issuer_gateway: Gateway,
    client: ClientCredentials,
    tenant: str,
    tmp_path: Path,
) -> None:
    front = EnvoyFront(
        tmp_path, "127.0.0.1:0", upstream_port=issuer_gateway.port, issuer_port=issuer.port
    )
    await asyncio.to_thread(front.start)
    try:
        context = ssl.create_default_context(cafile=str(front.certificate))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        async with httpx.AsyncClient(
            base_url=f"https://localhost:{front.port}", verify=context, timeout=30
        ) as https:
            response = await https.post(TOKEN, data=form(client))
            assert response.status_code == 200, response.text
            token = response.json()["access_token"]
            assert response.headers["cache-control"] == "no-store"

            # The issuer's own error bodies pass through, not rewritten into the REST API's.
            refused = await https.post(TOKEN, data=form(client, client_secret="wrong"))
            assert_oauth_error(refused, 401, "invalid_client")
            too_large = await https.post(
                TOKEN,
                content=b"a" * (64 * 1024 + 1),
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert_oauth_error(too_large, 413, "invalid_request")
            keys = (await https.get(JWKS)).json()["keys"]
            assert jwt.get_unverified_header(token)["kid"] in {key["kid"] for key in keys}

            payload = {
                "data_points": [
                    {
                        "well_id": "WELL_002",
                        "timestamp": "2025-11-06T14:30:00Z",
                        "parameter_name": "wellhead_pressure",
                        "value": 6750.5,
                        "unit": "psi",
                    }
                ]
            }
            ingested = await https.post(
                "/v1/ingest/realtime", json=payload, headers={"authorization": f"Bearer {token}"}
            )
            assert ingested.status_code == 200, ingested.text
            assert (ingested.json()["tenant_id"], ingested.json()["accepted_count"]) == (tenant, 1)
            # The REST API's errors keep their documented body.
            unauthorised = await https.post(
                "/v1/ingest/realtime", json=payload, headers={"authorization": "Bearer x"}
            )
            assert unauthorised.status_code == 401
            assert set(unauthorised.json()) == {"error", "message"}
    finally:
        await asyncio.to_thread(front.stop)
