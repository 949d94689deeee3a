"""``welltegra-ingest``: run the gateway and administer it.

    welltegra-ingest serve [--config FILE] [--data-dir DIR] [--grpc-listen HOST:PORT] [--dev] ...
    welltegra-ingest tenants create NAME | tenants list
    welltegra-ingest query --tenant NAME [--well W] [--since T] ... | gaps --tenant NAME ...
    welltegra-ingest token mint --tenant NAME [--scope S ...] [--ttl 1h]
    welltegra-ingest clients create --tenant NAME [--scope S ...] | clients list | clients revoke ID
    welltegra-ingest issuer rotate

Without ``DATABASE_URL``/``REDIS_URL`` (or their flags and config keys) the gateway starts a real
PostgreSQL and Redis from pip-installed wheels under the data directory; the admin commands
attach to those while ``serve`` runs, or start them for the command's duration.

Errors a user can fix (bad flags or config, an unreachable database, a port in use) are printed
as one line and exit with status 2; nothing else here calls ``sys.exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ingest_service.config import (
    DEV_ISSUER,
    ConfigError,
    GatewayConfig,
    load_config,
    parse_duration,
)
from ingest_service.crypto import KeyringError
from ingest_service.dev_issuer import (
    DevIssuer,
    DevIssuerError,
    create_client,
    list_clients,
    revoke_client,
    rotate_signing_key,
)
from ingest_service.devkeys import DevSigningKey
from ingest_service.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError
from ingest_service.envoy_front import ENVOY_DIR, EnvoyError, EnvoyFront
from ingest_service.errors import GatewayError
from ingest_service.server import Gateway, ListenError
from ingest_service.storage import DatabaseUnreachable, Storage, StoredGap
from ingest_service.validation import StoredPoint

__all__ = ["main"]

log = logging.getLogger("welltegra_ingest")


class UsageError(Exception):
    """A problem the user fixes by changing the command line or configuration."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./.welltegra)")
    parser.add_argument(
        "--database-url", help="PostgreSQL URL (default: env DATABASE_URL, else embedded)"
    )
    parser.add_argument("--redis-url", help="Redis URL (default: env REDIS_URL, else embedded)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="welltegra-ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ingest gateway")
    _common(serve)
    serve.add_argument(
        "--grpc-listen", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:50051)"
    )
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for the gRPC port")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--jwks-url", help="JWKS URL of the token issuer")
    serve.add_argument(
        "--public-key",
        type=Path,
        action="append",
        help="trusted issuer public key (PEM); repeatable",
    )
    serve.add_argument(
        "--envoy-listen",
        metavar="HOST:PORT",
        help="also run Envoy here: TLS 1.3, REST (POST /v1/ingest/realtime) and gRPC",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at GET /metrics here (e.g. 127.0.0.1:9464; default off)",
    )
    serve.add_argument("--envoy-cert", type=Path, help="Envoy's certificate (default: self-signed)")
    serve.add_argument("--envoy-key", type=Path, help="Envoy's private key")
    serve.add_argument("--issuer", help="expected token issuer (iss)")
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="also trust the local development signing key that `token mint` uses",
    )
    serve.add_argument("--audience", help="expected token audience (aud)")
    serve.add_argument(
        "--dev-issuer",
        action="store_true",
        default=None,
        help="also run the development OAuth issuer (POST /oauth/token) and trust its JWKS",
    )
    serve.add_argument(
        "--dev-issuer-listen",
        metavar="HOST:PORT",
        help="the development issuer's address (default 127.0.0.1:8081); implies --dev-issuer",
    )

    tenants = commands.add_parser("tenants", help="manage tenants")
    tenant_commands = tenants.add_subparsers(dest="tenant_command", required=True)
    create = tenant_commands.add_parser("create", help="provision a tenant and its schema")
    _common(create)
    create.add_argument("name", help="tenant id, e.g. operator_shell_uk")
    listing = tenant_commands.add_parser("list", help="list provisioned tenants")
    _common(listing)
    limits = tenant_commands.add_parser(
        "set-limits", help="override the configured limits for one tenant (0 = back to default)"
    )
    _common(limits)
    limits.add_argument("name")
    limits.add_argument("--requests-per-minute", type=_count, metavar="N")
    limits.add_argument("--max-message-bytes", type=_count, metavar="N")
    limits.add_argument("--bytes-per-day", type=_count, metavar="N")
    rotate = tenant_commands.add_parser(
        "rotate-key", help="new data key for new writes; stored values stay readable"
    )
    _common(rotate)
    rotate.add_argument("name")
    shred = tenant_commands.add_parser(
        "shred", help="destroy the tenant's data keys: its stored values become unreadable"
    )
    _common(shred)
    shred.add_argument("name")
    shred.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")

    query = commands.add_parser(
        "query", help="read a tenant's stored points, decrypted (operators, inside the cloud)"
    )
    _common(query)
    query.add_argument("--tenant", required=True)
    query.add_argument("--well")
    query.add_argument("--parameter")
    query.add_argument("--since", type=_instant, help="RFC 3339 time, inclusive")
    query.add_argument("--until", type=_instant, help="RFC 3339 time, exclusive")
    query.add_argument("--format", choices=("csv", "json"), default="csv")

    gaps = commands.add_parser(
        "gaps", help="list the data gaps (points lost on the agents) a tenant's agents reported"
    )
    _common(gaps)
    gaps.add_argument("--tenant", required=True)
    gaps.add_argument("--well")
    gaps.add_argument(
        "--since", type=_instant, help="RFC 3339 time: only gaps that end at or after it"
    )
    gaps.add_argument(
        "--limit", type=_positive, default=100, help="at most this many, newest first (100)"
    )
    gaps.add_argument("--format", choices=("csv", "json"), default="csv")
    gaps.add_argument(
        "--json", dest="format", action="store_const", const="json", help="same as --format json"
    )

    token = commands.add_parser("token", help="development access tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    mint = token_commands.add_parser("mint", help="print a token signed with the development key")
    _common(mint)
    mint.add_argument("--tenant", required=True)
    mint.add_argument(
        "--scope", action="append", help="scope to grant (default api:ingest); repeatable"
    )
    mint.add_argument("--ttl", default="1h", help="lifetime such as 15m, 1h, 1d (default 1h)")
    mint.add_argument("--subject", default="dev-client", help="the token's sub claim")

    clients = commands.add_parser("clients", help="OAuth clients of the development issuer")
    client_commands = clients.add_subparsers(dest="client_command", required=True)
    new_client = client_commands.add_parser(
        "create", help="register a client of a tenant; prints its secret, this once only"
    )
    _common(new_client)
    new_client.add_argument("--tenant", required=True)
    new_client.add_argument(
        "--scope", action="append", help="scope it may ask for (default api:ingest); repeatable"
    )
    client_list = client_commands.add_parser("list", help="list registered clients")
    _common(client_list)
    client_list.add_argument("--tenant", help="only this tenant's")
    revoke = client_commands.add_parser("revoke", help="refuse the client any new token")
    _common(revoke)
    revoke.add_argument("client_id")

    issuer = commands.add_parser("issuer", help="the development issuer's signing keys")
    issuer_commands = issuer.add_subparsers(dest="issuer_command", required=True)
    rotate_signing = issuer_commands.add_parser(
        "rotate", help="new signing key; the previous one stays published until the next"
    )
    _common(rotate_signing)
    return parser


def _instant(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from exc
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +00:00)")
    return moment


def _positive(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {2**31 - 1}")
    return int(text)


def _count(text: str) -> int:
    # Limits are stored as 32-bit integers (bytes per day as 64-bit, which no day reaches).
    if not text.isdigit() or int(text) > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {2**31 - 1}")
    return int(text)


def _config(args: argparse.Namespace, **extra: Any) -> GatewayConfig:
    """The configuration file, then the environment, then these flags."""
    overrides: dict[str, Any] = {
        "data_dir": args.data_dir,
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        **extra,
    }
    return load_config(args.config, overrides)


@contextlib.contextmanager
def _servers(config: GatewayConfig) -> Iterator[tuple[str, str | None]]:
    """The database and Redis URLs: configured ones, else embedded servers in the data dir."""
    with contextlib.ExitStack() as stack:
        database_url = config.database_url
        redis_url = config.redis_url
        if database_url is None:
            postgres = EmbeddedPostgres(config.data_dir)
            stack.callback(postgres.stop)
            database_url = postgres.start()
        if redis_url is None:
            redis = EmbeddedRedis(config.data_dir)
            stack.callback(redis.stop)
            redis_url = redis.start()
        yield database_url, redis_url


async def _serve(config: GatewayConfig) -> None:
    with _servers(config) as (database_url, redis_url):
        issuer = DevIssuer(config) if config.dev_issuer.enabled else None
        if issuer is not None:
            # Bound first: the gateway needs the issuer's JWKS URL (its port) to start.
            await issuer.bind()
            config = issuer.gateway_config(config)
        gateway = Gateway(config, database_url, redis_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        front: EnvoyFront | None = None
        try:
            port = await gateway.start()
            host = config.grpc_listen.rpartition(":")[0]
            print(f"welltegra-ingest: serving gRPC on {host}:{port}", flush=True)
            if config.metrics_listen is not None:
                metrics_host = config.metrics_listen.rpartition(":")[0]
                print(
                    f"welltegra-ingest: serving metrics on"
                    f" http://{metrics_host}:{gateway.metrics_port}/metrics",
                    flush=True,
                )
            if issuer is not None:
                await issuer.start(gateway.storage.pool)
                print(
                    f"welltegra-ingest: serving the development OAuth issuer on"
                    f" {issuer.base_url} (iss {issuer.issuer})",
                    flush=True,
                )
            if config.envoy is not None:
                front = EnvoyFront(
                    config.data_dir,
                    config.envoy.listen,
                    upstream_port=port,
                    cert_file=config.envoy.cert_file,
                    key_file=config.envoy.key_file,
                    config_dir=config.envoy.config_dir or ENVOY_DIR,
                    issuer_port=issuer.port if issuer is not None else None,
                )
                envoy_port = await asyncio.to_thread(front.start)
                envoy_host = config.envoy.listen.rpartition(":")[0]
                print(
                    f"welltegra-ingest: serving REST and gRPC over TLS 1.3 on"
                    f" {envoy_host}:{envoy_port} (certificate {front.certificate})",
                    flush=True,
                )
            await stop.wait()
            log.info("shutting down")
        finally:
            if front is not None:
                front.stop()
            if issuer is not None:
                await issuer.stop()
            await gateway.stop()


_NEEDS_MASTER_KEY = {"create", "rotate-key", "query", "gaps"}


async def _with_storage(config: GatewayConfig, args: argparse.Namespace) -> None:
    action = args.tenant_command if args.command == "tenants" else args.command
    if action == "shred" and not args.yes:
        raise UsageError(f"shredding makes every stored value of {args.name} unreadable: add --yes")
    try:
        needs_key = action in _NEEDS_MASTER_KEY
        provider = config.key_provider(os.environ, admin=True) if needs_key else None
    except KeyringError as exc:
        raise UsageError(str(exc)) from exc
    with _servers(config) as (database_url, _redis_url):
        storage = await Storage.connect(database_url, config.storage, provider)
        try:
            await _admin(storage, action, args)
        finally:
            await storage.close()


async def _admin(storage: Storage, action: str, args: argparse.Namespace) -> None:
    if action == "create":
        created = await storage.create_tenant(args.name)
        print(f"tenant {args.name} {'created' if created else 'already exists'}")
    elif action == "set-limits":
        await _set_limits(storage, args)
    elif action == "rotate-key":
        version = await storage.keys.rotate(args.name)
        print(f"tenant {args.name}: new writes use data key version {version}")
    elif action == "shred":
        destroyed = await storage.keys.shred(args.name)
        print(f"tenant {args.name} shredded: {destroyed} data keys destroyed")
    elif action == "query":
        await _query(storage, args)
    elif action == "gaps":
        await _gaps(storage, args)
    else:
        for tenant in await storage.list_tenants():
            print(tenant)


async def _query(storage: Storage, args: argparse.Namespace) -> None:
    points = storage.read_points(args.tenant, args.well, args.parameter, args.since, args.until)
    if args.format == "json":
        async for p in points:
            print(json.dumps({**_as_dict(p), "timestamp": p.timestamp.isoformat()}))
        return
    writer = csv.writer(sys.stdout)
    writer.writerow(StoredPoint._fields)
    async for p in points:
        writer.writerow({**_as_dict(p), "timestamp": p.timestamp.isoformat()}.values())


def _as_dict(point: StoredPoint) -> dict[str, Any]:
    return point._asdict()


async def _gaps(storage: Storage, args: argparse.Namespace) -> None:
    gaps = storage.read_gaps(args.tenant, args.well, args.since, args.limit)
    writer = csv.writer(sys.stdout) if args.format == "csv" else None
    if writer is not None:
        writer.writerow(StoredGap._fields)
    async for gap in gaps:
        row = {
            **gap._asdict(),
            **{
                name: getattr(gap, name).isoformat()
                for name in ("first_timestamp", "last_timestamp", "received_at")
            },
        }
        if writer is not None:
            writer.writerow(row.values())
        else:
            print(json.dumps(row))


async def _set_limits(storage: Storage, args: argparse.Namespace) -> None:
    given = {
        name: getattr(args, name)
        for name in ("requests_per_minute", "max_message_bytes", "bytes_per_day")
        if getattr(args, name) is not None
    }
    if not given:
        raise UsageError(
            "give at least one of --requests-per-minute, --max-message-bytes, --bytes-per-day"
        )
    await storage.set_limit_overrides(args.name, {k: v or None for k, v in given.items()})
    now = await storage.limit_overrides(args.name)
    shown = ", ".join(f"{k}={v}" for k, v in now.items()) or "the configured defaults"
    # Gateways cache overrides for limits.overrides_cache (30 s by default).
    print(f"tenant {args.name} limits: {shown}")


def _mint(config: GatewayConfig, args: argparse.Namespace) -> None:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from exc
    key = DevSigningKey.load_or_create(config.dev_key_file)
    print(
        key.mint(
            tenant_id=args.tenant,
            audience=config.auth.audience,
            scopes=args.scope or ("api:ingest",),
            ttl_seconds=int(ttl.total_seconds()),
            subject=args.subject,
            tenant_claim=config.auth.tenant_claim,
            issuer=config.issuer or DEV_ISSUER,
        )
    )


async def _clients(config: GatewayConfig, args: argparse.Namespace) -> None:
    with _servers(config) as (database_url, _redis_url):
        storage = await Storage.connect(database_url, config.storage)
        try:
            if args.client_command == "create":
                try:
                    client = await create_client(
                        storage.pool, args.tenant, args.scope or ("api:ingest",)
                    )
                except ValueError as exc:
                    raise UsageError(f"--scope: {exc}") from exc
                print(f"client_id: {client.client_id}")
                print(f"client_secret: {client.client_secret}")
                print(
                    "welltegra-ingest: the secret is shown this once only; it is stored hashed",
                    file=sys.stderr,
                )
            elif args.client_command == "revoke":
                if not await revoke_client(storage.pool, args.client_id):
                    raise UsageError(f"no client {args.client_id!r} to revoke")
                print(f"client {args.client_id} revoked")
            else:
                for listed in await list_clients(storage.pool, args.tenant):
                    state = f"revoked {listed.revoked_at.isoformat()}" if listed.revoked_at else ""
                    fields = (listed.client_id, listed.tenant_id, ",".join(listed.scopes), state)
                    print(" ".join(fields).rstrip())
        finally:
            await storage.close()


def _run(args: argparse.Namespace) -> None:
    if args.command == "serve":
        config = _config(
            args,
            grpc_listen=args.grpc_listen,
            metrics_listen=args.metrics_listen,
            dev=args.dev,
            # Merged key by key with the file's sections, so a flag may complete a section.
            tls={"cert_file": args.tls_cert, "key_file": args.tls_key},
            envoy={
                "listen": args.envoy_listen,
                "cert_file": args.envoy_cert,
                "key_file": args.envoy_key,
            },
            auth={
                "jwks_url": args.jwks_url,
                "public_key_files": args.public_key,
                "issuer": args.issuer,
                "audience": args.audience,
            },
            dev_issuer={
                "enabled": True if args.dev_issuer or args.dev_issuer_listen else None,
                "listen": args.dev_issuer_listen,
            },
        )
        problem = config.token_key_problem()
        if problem:
            raise UsageError(problem)
        asyncio.run(_serve(config))
    elif args.command in ("tenants", "query", "gaps"):
        asyncio.run(_with_storage(_config(args), args))
    elif args.command == "token":
        _mint(_config(args), args)
    elif args.command == "clients":
        asyncio.run(_clients(_config(args), args))
    elif args.command == "issuer":
        kid = rotate_signing_key(_config(args).data_dir)
        print(f"new signing key {kid}; the previous one stays in the JWKS until the next rotation")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _run(args)
    except (
        UsageError,
        ConfigError,
        DatabaseUnreachable,
        EmbeddedServerError,
        ListenError,
        EnvoyError,
        GatewayError,
        KeyringError,
        DevIssuerError,
    ) as exc:
        print(f"welltegra-ingest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
