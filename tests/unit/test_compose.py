"""docker-compose.yml and the gateway's Dockerfile, checked statically (no Docker engine here):
every file they reference exists, and ports, paths and names agree with envoy/envoy.yaml and
the gateway's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ingest_service.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENVOY: dict[str, Any] = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item["name"] == name)


def mounts(service: str) -> dict[str, str]:
    """container path -> host path of a service's bind mounts."""
    found = {}
    for volume in COMPOSE["services"][service].get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("."):
            found[container] = host
    return found


def test_services_and_dependencies() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "redis", "gateway", "envoy"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        if name != "envoy":
            assert "healthcheck" in service or name == "gateway"  # the image has HEALTHCHECK
    for name in COMPOSE.get("volumes", {}):
        assert any(name in str(s.get("volumes")) for s in services.values())


def test_every_referenced_host_file_exists() -> None:
    for service in COMPOSE["services"]:
        for container, host in mounts(service).items():
            if host != "./certs":  # the operator's certificate, never committed
                assert (ROOT / host).exists(), f"{service}: {host} -> {container}"
    build = COMPOSE["services"]["gateway"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_envoy_service_runs_the_production_envoy_yaml() -> None:
    envoy_mounts = mounts("envoy")
    command = COMPOSE["services"]["envoy"]["command"]
    config_path = command[command.index("--config-path") + 1]
    assert envoy_mounts[config_path] == "./envoy/envoy.yaml"
    listener = named(ENVOY["static_resources"]["listeners"], "ingress")
    chain = listener["filter_chains"][0]
    certificate = chain["transport_socket"]["typed_config"]["common_tls_context"][
        "tls_certificates"
    ][0]
    cert_dir = str(Path(certificate["certificate_chain"]["filename"]).parent)
    assert envoy_mounts[cert_dir] == "./certs"
    assert str(Path(certificate["private_key"]["filename"]).parent) == cert_dir
    filters = named(chain["filters"], "envoy.filters.network.http_connection_manager")[
        "typed_config"
    ]["http_filters"]
    lua = named(filters, "envoy.filters.http.lua")["typed_config"]["default_source_code"]
    assert envoy_mounts[lua["filename"]] == "./envoy/error_body.lua"
    transcoder = named(filters, "envoy.filters.http.grpc_json_transcoder")["typed_config"]
    assert envoy_mounts[transcoder["proto_descriptor"]] == "./gen/welltegra_ingest.binpb"
    port = listener["address"]["socket_address"]["port_value"]
    assert f"{port}:{port}" in COMPOSE["services"]["envoy"]["ports"]


def test_gateway_address_agrees_with_envoy_and_its_config() -> None:
    cluster = named(ENVOY["static_resources"]["clusters"], "ingest_gateway")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    address = endpoint["address"]["socket_address"]
    assert address["address"] in COMPOSE["services"]
    gateway_config_file = next(
        host for container, host in mounts("gateway").items() if container.endswith(".yaml")
    )
    config = load_config(ROOT / gateway_config_file, environ={})
    assert config.token_key_problem() is None
    assert int(config.grpc_listen.rpartition(":")[2]) == address["port_value"]
    assert str(address["port_value"]) in COMPOSE["services"]["gateway"]["expose"]
    dockerfile = (ROOT / "ingest_service" / "Dockerfile").read_text()
    assert f"EXPOSE {address['port_value']}" in dockerfile
    assert f"127.0.0.1:{address['port_value']}" in dockerfile  # the HEALTHCHECK


def test_gateway_image_is_multi_stage_and_runs_as_uid_1000() -> None:
    dockerfile = (ROOT / "ingest_service" / "Dockerfile").read_text()
    stages = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and all("python:3.11-slim" in s for s in stages)
    assert "USER 1000" in dockerfile and "HEALTHCHECK" in dockerfile


def test_secrets_come_from_the_environment() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text
    assert "POSTGRES_PASSWORD=" in (ROOT / ".env.example").read_text()
