"""The gateway process: wires the pipeline stages to a ``grpc.aio`` server with health and
reflection, and owns their lifecycle (start, graceful stop). Tracing (off unless the ``OTEL_*``
environment asks for it, see ``tracing``) starts first and is flushed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from redis import asyncio as aioredis

from ingest_service.audit import AuditLog
from ingest_service.auth import AuthInterceptor, TokenVerifier
from ingest_service.cache import LatestValueCache
from ingest_service.config import ConfigError, GatewayConfig
from ingest_service.crypto import KeyringError
from ingest_service.devkeys import DevSigningKey
from ingest_service.limits import AdmitAll, ConfiguredLimits, Limiter, LimitPolicy, RedisLimiter
from ingest_service.metrics import GatewayMetrics
from ingest_service.parameters import ParameterRegistry
from ingest_service.service import SERVICE_NAME, IngestPipeline
from ingest_service.storage import Storage
from ingest_service.tracing import GATEWAY_SERVICE, Tracing
from ingest_service.validation import Validator

__all__ = ["Gateway", "ListenError"]

log = logging.getLogger(__name__)

HEALTH_INTERVAL_SECONDS = 2.0


class ListenError(RuntimeError):
    """The gRPC listener (or the metrics endpoint) cannot bind its address."""


class Gateway:
    """One running gateway: storage, cache, audit and the gRPC server in front of them."""

    def __init__(self, config: GatewayConfig, database_url: str, redis_url: str | None) -> None:
        self.config = config
        self._database_url = database_url
        self._redis_url = redis_url
        self._storage: Storage | None = None
        self._cache: LatestValueCache | None = None
        self._audit: AuditLog | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._limits_client: aioredis.Redis | None = None
        self._redis_limiter: RedisLimiter | None = None
        self._metrics_server: tuple[WSGIServer, threading.Thread] | None = None
        self.metrics = GatewayMetrics()
        self.tracing = Tracing.off()
        self.port = 0
        self.metrics_port = 0

    @property
    def storage(self) -> Storage:
        assert self._storage is not None, "gateway not started"
        return self._storage

    @property
    def cache_failures(self) -> int:
        """Batches whose latest values could not be cached (Redis away)."""
        return self._cache.failures if self._cache is not None else 0

    @property
    def limits_fallback_episodes(self) -> int:
        """How often the limits fell back to in-process buckets (Redis away)."""
        return self._redis_limiter.fallback_episodes if self._redis_limiter is not None else 0

    @property
    def audit(self) -> AuditLog:
        assert self._audit is not None, "gateway not started"
        return self._audit

    async def start(self) -> int:
        """Connect to storage and cache, then listen; returns the bound port."""
        config = self.config
        problem = config.token_key_problem()
        if problem or not config.issuer:
            raise ConfigError(problem or "auth.issuer is required")
        registry = ParameterRegistry.with_extra(config.parameters)
        try:
            provider = config.key_provider(os.environ, admin=False)
        except KeyringError as exc:
            raise ConfigError(str(exc)) from exc
        if not self.tracing.enabled:  # a retried start keeps the tracing it has
            self.tracing = Tracing.from_environ(GATEWAY_SERVICE)
        tracer = self.tracing.tracer
        self._storage = await Storage.connect(
            self._database_url, config.storage, provider, tracer=tracer
        )
        unopened = await self._storage.keys.tenants_it_cannot_open()
        if unopened:
            # Not fatal: one database may be shared (tests, benchmarks), and the other tenants
            # work. Writes for these fail with UNAVAILABLE until the right key is given.
            log.error(
                "the master key does not open the data keys of %d tenants (e.g. %s): is it the"
                " key this database was set up with?",
                len(unopened),
                ", ".join(unopened[:5]),
            )
        self._audit = AuditLog(self._storage.pool)
        self._audit.start()
        if self._redis_url:
            client = aioredis.Redis.from_url(
                self._redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            self._cache = LatestValueCache(
                client, int(config.cache_ttl.total_seconds()), self.metrics, tracer=tracer
            )
        extra_keys = []
        if config.dev:
            extra_keys.append(DevSigningKey.load_or_create(config.dev_key_file).public_path)
        verifier = TokenVerifier(config.auth, config.issuer, extra_keys)
        pipeline = IngestPipeline(
            storage=self._storage,
            cache=self._cache,
            validator=Validator(registry, config.storage.future_tolerance, config.storage.max_age),
            limiter=self._limiter(),
            audit=self._audit,
            metrics=self.metrics,
            tracer=tracer,
        )
        server = grpc.aio.server(
            interceptors=[
                AuthInterceptor(
                    verifier, self._audit, f"/{SERVICE_NAME}/", self.metrics, tracer=tracer
                )
            ],
            options=[
                # The limits stage refuses what is over a tenant's limit, with a reason and an
                # audit row; grpc itself only stops what is far beyond it.
                ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        server.add_generic_rpc_handlers((pipeline.rpc_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = self._listen(server)
        self._server = server
        await server.start()
        await self._set_health(await self._storage.ping())
        self._health_task = asyncio.create_task(self._watch_health(), name="health-watch")
        log.info("gateway listening on %s (port %d)", config.grpc_listen, self.port)
        if config.metrics_listen is not None:
            self.metrics_port = self._serve_metrics(config.metrics_listen)
            log.info("metrics on %s (port %d)", config.metrics_listen, self.metrics_port)
        return self.port

    def _serve_metrics(self, address: str) -> int:
        """``GET /metrics`` on ``address`` (prometheus_client's server, in a thread of its own)."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            server, thread = start_http_server(int(port), host, registry=self.metrics.registry)
        except OSError as exc:
            raise ListenError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
        self._metrics_server = (server, thread)
        return int(server.server_port)

    def _limiter(self) -> Limiter:
        limits = self.config.limits
        if not limits.enabled:
            return AdmitAll()
        defaults = LimitPolicy(
            requests_per_minute=limits.requests_per_minute,
            max_message_bytes=self.config.max_message_bytes,
            bytes_per_day=limits.bytes_per_day,
        )
        client = None
        if self._redis_url:
            timeout = limits.redis_timeout.total_seconds()
            # Its own client: the limits' short timeout must not apply to the cache.
            client = aioredis.Redis.from_url(
                self._redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            self._limits_client = client
        overrides = ConfiguredLimits(
            defaults, self.storage.limit_overrides, limits.overrides_cache.total_seconds()
        )
        self._redis_limiter = RedisLimiter(client, overrides, metrics=self.metrics)
        return self._redis_limiter

    def _listen(self, server: grpc.aio.Server) -> int:
        address = self.config.grpc_listen
        try:
            if self.config.tls is None:
                port = server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [
                        (
                            self.config.tls.key_file.read_bytes(),
                            self.config.tls.cert_file.read_bytes(),
                        )
                    ]
                )
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if not port:
            raise ListenError(
                f"cannot listen on {address}: the address is in use or not local"
            ) from cause
        return int(port)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _watch_health(self) -> None:
        # Serving only while Postgres answers, so Envoy and orchestrators route around us.
        serving = True
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_SECONDS)
            now_serving = await self.storage.ping()
            if now_serving != serving:
                log.warning(
                    "database %s", "is back: SERVING" if now_serving else "unreachable: NOT_SERVING"
                )
                serving = now_serving
            await self._set_health(serving)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, let running ones finish within ``grace``, then close. Safe to call
        after a failed or partial start."""
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            self._metrics_server = None
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            thread.join(timeout=5)
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
        if self._audit is not None:
            await self._audit.close()
        if self._cache is not None:
            await self._cache.close()
        if self._limits_client is not None:
            await self._limits_client.aclose()
        if self._storage is not None:
            await self._storage.close()
        # Last, so the spans of the calls that finished during the grace period go too.
        await asyncio.to_thread(self.tracing.shutdown)
