"""docker-compose.yml, checked statically (there is no Docker engine here): the file has the
Compose specification's shape; every file and folder it mounts or builds from exists (or is made
by deploy/certs/make-dev-certs.sh); every ${VAR} is in .env.example; every service has a health
check and starts after the services it needs are healthy; ports, paths and names agree with
envoy/envoy.yaml, the gateway's and the agent's configuration, the Dockerfiles and Prometheus;
and deploy/agent/config.yaml loads with the values .env.example gives, its OPC UA tags being
the variables of the opcua-simulator service's script (deploy/opcua-simulator/well_simulator.py,
which tests/integration/test_opcua_simulator.py runs and probes).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from edge.collectors.opcua import OpcUaConfig
from edge.collectors.simulator import SIMULATED_PARAMETERS
from edge.config import load_agent_config
from ingest_service.config import load_config
from ingest_service.dev_issuer import TOKEN_PATH
from tests.unit.deploy_checks import (
    COMPOSE,
    ROOT,
    envoy_gateway_address,
    envoy_listener,
    named,
)

COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
# What compose interpolates: the values, not the comments.
COMPOSE_VALUES = yaml.safe_dump(COMPOSE, width=1_000_000)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
AGENT_CONFIG = ROOT / "deploy" / "agent" / "config.yaml"
GATEWAY_CONFIG = ROOT / "deploy" / "gateway.compose.yaml"
# Made on the operator's machine by this script, never committed.
CERT_SCRIPT = ROOT / "deploy" / "certs" / "make-dev-certs.sh"
GENERATED = {"./deploy/certs/ca.crt", "./deploy/certs/tls.crt", "./deploy/certs/tls.key"}
OPCUA_SIMULATOR = ROOT / "deploy" / "opcua-simulator" / "well_simulator.py"

TOP_LEVEL = {"name", "services", "volumes", "networks", "secrets", "configs"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "volumes", "ports",
    "expose", "healthcheck", "depends_on", "restart", "user", "read_only", "tmpfs", "cap_drop",
    "security_opt", "networks", "logging", "stop_grace_period",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME=value"
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}, ${VAR-default}."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        value = environ.get(name)
        if operator in (":-", "-"):
            unset = value is None or (operator == ":-" and value == "")
            return argument if unset else str(value)
        if operator in (":?", "?") and (value is None or (operator == ":?" and value == "")):
            raise AssertionError(f"{name}: {argument}")
        assert value is not None, f"{name} is not set"
        return value

    return _REFERENCE.sub(replace, text)


def mounts(service: str) -> dict[str, str]:
    """container path -> host path of a service's bind mounts, short and long syntax."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        if isinstance(volume, dict):
            if volume["type"] == "bind":
                found[volume["target"]] = volume["source"]
            continue
        host, container, *_ = volume.split(":")
        if host.startswith("."):
            found[container] = host
    return found


def named_volumes(service: str) -> dict[str, str]:
    """container path -> named volume."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        if isinstance(volume, str) and not volume.startswith((".", "/")):
            name, container, *_ = volume.split(":")
            found[container] = name
        elif isinstance(volume, dict) and volume["type"] == "volume":
            found[volume["target"]] = volume["source"]
    return found


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def load_well_simulator() -> ModuleType:
    """deploy/opcua-simulator/well_simulator.py, imported (its folder is not a package)."""
    name = "welltegra_well_simulator"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, OPCUA_SIMULATOR)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def agent_environment() -> dict[str, str]:
    """The agent container's environment, as compose would give it from .env.example."""
    environment = SERVICES["agent"]["environment"]
    return {key: interpolate(str(value), env_example()) for key, value in environment.items()}


# -- shape ----------------------------------------------------------------------------------


def test_top_level_and_service_keys_follow_the_compose_specification() -> None:
    assert set(COMPOSE) <= TOP_LEVEL
    assert "version" not in COMPOSE, "obsolete in the Compose specification"
    for name, service in SERVICES.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name)
        assert set(service) <= SERVICE_KEYS, f"{name}: {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service, name
        if "image" in service:
            assert not service["image"].endswith(":latest") and ":" in service["image"], name
        for key in ("environment",):
            assert isinstance(service.get(key, {}), dict), f"{name}.{key} is a mapping here"
        for port in service.get("ports", []):
            assert re.fullmatch(r"(127\.0\.0\.1:)?\d+:\d+", port), f"{name}: {port}"
        for port in service.get("expose", []):
            assert isinstance(port, str) and port.isdigit(), f"{name}: expose {port!r}"


def test_the_services_of_the_stack() -> None:
    assert set(SERVICES) == {
        "postgres", "redis", "jaeger", "gateway", "envoy", "opcua-simulator", "agent",
        "prometheus", "grafana",
    }  # fmt: skip


def test_every_service_has_a_health_check() -> None:
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert set(check) <= HEALTHCHECK_KEYS
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert {"interval", "timeout", "retries"} <= set(check), name


def test_start_order_waits_for_healthy_dependencies() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            assert spec["condition"] in CONDITIONS
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency]

    def healthy_needs(name: str) -> set[str]:
        return {
            d
            for d, spec in SERVICES[name].get("depends_on", {}).items()
            if spec["condition"] == "service_healthy"
        }

    assert healthy_needs("gateway") == {"postgres", "redis"}
    assert healthy_needs("envoy") == {"gateway"}
    assert healthy_needs("opcua-simulator") == set()
    assert healthy_needs("agent") == {"envoy", "gateway", "opcua-simulator"}
    assert healthy_needs("grafana") == {"prometheus"}
    # No cycle: every service can be started.
    started: set[str] = set()
    while len(started) < len(SERVICES):
        ready = {
            n
            for n in SERVICES
            if n not in started and set(SERVICES[n].get("depends_on", {})) <= started
        }
        assert ready, f"dependency cycle among {set(SERVICES) - started}"
        started |= ready


def test_named_volumes_are_declared_and_used() -> None:
    used = {v for s in SERVICES for v in named_volumes(s).values()}
    assert used == set(COMPOSE["volumes"])


# -- files ----------------------------------------------------------------------------------


def test_every_referenced_host_file_exists() -> None:
    for service in SERVICES:
        for container, host in mounts(service).items():
            assert host.startswith("./"), f"{service}: {host} is not relative to the project"
            if host in GENERATED:
                assert Path(host).name in CERT_SCRIPT.read_text()
                continue
            assert (ROOT / host).exists(), f"{service}: {host} -> {container}"
    for name, spec in SERVICES.items():
        if "build" in spec:
            build = spec["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


def test_certificates_are_required_not_created_empty() -> None:
    for service in ("envoy", "agent"):
        for volume in SERVICES[service]["volumes"]:
            if isinstance(volume, dict) and volume["source"] in GENERATED:
                assert volume["read_only"] is True
                # Without it, a missing file is mounted as an empty folder made by Docker.
                assert volume["bind"]["create_host_path"] is False


def test_every_variable_is_in_env_example() -> None:
    referenced = {match.group(1) for match in _REFERENCE.finditer(COMPOSE_VALUES)}
    example = env_example()
    assert referenced <= set(example), f"missing from .env.example: {referenced - set(example)}"
    assert set(example) <= referenced, f"unused in .env.example: {set(example) - referenced}"
    assert "$" not in _REFERENCE.sub("", COMPOSE_VALUES).replace("$$", ""), "a bare $VAR"
    interpolate(COMPOSE_VALUES, example)  # every ${VAR:?} is satisfied


def test_secrets_come_from_the_environment() -> None:
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|CLIENT_ID", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key}"
    gateway_env = SERVICES["gateway"]["environment"]
    assert "${POSTGRES_PASSWORD:?" in gateway_env["DATABASE_URL"]
    assert (ROOT / ".gitignore").read_text().count(".env") >= 1


# -- agreement between files ----------------------------------------------------------------


def test_envoy_service_runs_the_production_envoy_yaml() -> None:
    envoy_mounts = mounts("envoy")
    command = SERVICES["envoy"]["command"]
    config_path = command[command.index("--config-path") + 1]
    assert envoy_mounts[config_path] == "./envoy/envoy.yaml"
    chain = envoy_listener()["filter_chains"][0]
    certificate = chain["transport_socket"]["typed_config"]["common_tls_context"][
        "tls_certificates"
    ][0]
    assert envoy_mounts[certificate["certificate_chain"]["filename"]] == "./deploy/certs/tls.crt"
    assert envoy_mounts[certificate["private_key"]["filename"]] == "./deploy/certs/tls.key"
    filters = named(chain["filters"], "envoy.filters.network.http_connection_manager")[
        "typed_config"
    ]["http_filters"]
    lua = named(filters, "envoy.filters.http.lua")["typed_config"]["default_source_code"]
    assert envoy_mounts[lua["filename"]] == "./envoy/error_body.lua"
    transcoder = named(filters, "envoy.filters.http.grpc_json_transcoder")["typed_config"]
    assert envoy_mounts[transcoder["proto_descriptor"]] == "./gen/welltegra_ingest.binpb"
    port = envoy_listener()["address"]["socket_address"]["port_value"]
    assert f"{port}:{port}" in SERVICES["envoy"]["ports"]
    # The key is readable by its owner only: Envoy runs as that user.
    assert SERVICES["envoy"]["environment"]["ENVOY_UID"] == "${HOST_UID:-1000}"


def test_gateway_address_agrees_with_envoy_its_config_and_its_image() -> None:
    address = envoy_gateway_address()
    assert address["address"] == "gateway" and "gateway" in SERVICES
    gateway_mounts = mounts("gateway")
    assert gateway_mounts["/etc/welltegra/gateway.yaml"] == "./deploy/gateway.compose.yaml"
    config = load_config(GATEWAY_CONFIG, environ={})
    assert config.token_key_problem() is None
    assert port_of(config.grpc_listen) == address["port_value"]
    expose = SERVICES["gateway"]["expose"]
    assert str(address["port_value"]) in expose
    assert config.metrics_listen is not None and str(port_of(config.metrics_listen)) in expose
    assert str(port_of(config.dev_issuer.listen)) in expose
    assert named_volumes("gateway")[str(config.data_dir)] == "gateway-data"
    dockerfile = (ROOT / "ingest_service" / "Dockerfile").read_text()
    assert f"127.0.0.1:{address['port_value']}" in dockerfile  # the HEALTHCHECK
    # The compose health check is the image's, word for word.
    assert SERVICES["gateway"]["healthcheck"]["test"][3] in dockerfile
    environment = SERVICES["gateway"]["environment"]
    database = urlsplit(interpolate(environment["DATABASE_URL"], env_example()))
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.password == env_example()["POSTGRES_PASSWORD"]
    assert urlsplit(environment["REDIS_URL"]).hostname == "redis"


def test_agent_config_loads_and_points_at_envoy_and_the_dev_issuer() -> None:
    config = load_agent_config(AGENT_CONFIG, agent_environment())
    listener_port = envoy_listener()["address"]["socket_address"]["port_value"]
    assert config.api.grpc_target == f"envoy:{listener_port}"
    assert config.api.tls.enabled
    agent_mounts = mounts("agent")
    assert agent_mounts["/etc/welltegra/config.yaml"] == "./deploy/agent/config.yaml"
    assert agent_mounts[str(config.api.tls.ca_file)] == "./deploy/certs/ca.crt"
    token_url = urlsplit(config.oauth.token_url)
    gateway = load_config(GATEWAY_CONFIG, environ={})
    assert gateway.dev_issuer.enabled
    assert (token_url.hostname, token_url.port) == ("gateway", port_of(gateway.dev_issuer.listen))
    assert token_url.path == TOKEN_PATH
    assert urlsplit(gateway.dev_issuer.issuer_url or "").hostname == "gateway"
    assert config.oauth.audience == gateway.auth.audience
    # The buffer lives on the agent's named volume.
    volumes = named_volumes("agent")
    assert volumes == {"/var/lib/welltegra": "agent-data"}
    assert config.buffer.database_path.parent == Path("/var/lib/welltegra")
    # Ports Prometheus and the health check use, on every address of the container.
    monitoring = config.monitoring
    assert monitoring.listen_address == "0.0.0.0"
    expose = SERVICES["agent"]["expose"]
    assert str(monitoring.health_check_port) in expose
    assert str(monitoring.prometheus_metrics_port) in expose
    check = SERVICES["agent"]["healthcheck"]["test"][3]
    assert f"http://127.0.0.1:{monitoring.health_check_port}/health" in check
    assert check in (ROOT / "edge" / "Dockerfile").read_text()
    # One source: the OPC UA well simulator (test_agent_reads_the_opcua_simulator).
    (source,) = config.data_sources
    assert isinstance(source, OpcUaConfig)


def test_opcua_simulator_runs_the_script_from_the_agent_image() -> None:
    simulator, agent = SERVICES["opcua-simulator"], SERVICES["agent"]
    assert OPCUA_SIMULATOR.is_file()
    # The agent's image: asyncua and edge.collectors.simulator, built the same way.
    assert simulator["image"] == agent["image"] and simulator["build"] == agent["build"]
    entrypoint = simulator["entrypoint"]
    assert entrypoint[0] == "python"
    script = Path(entrypoint[1])
    assert mounts("opcua-simulator")[str(script.parent)] == "./deploy/opcua-simulator"
    assert script.name == OPCUA_SIMULATOR.name
    assert all(v.endswith(":ro") for v in simulator["volumes"]), "the script is mounted read-only"
    command = simulator["command"]
    endpoint = urlsplit(command[command.index("--endpoint") + 1])
    assert (endpoint.scheme, endpoint.hostname) == ("opc.tcp", "0.0.0.0")
    port = endpoint.port or 4840
    # The health check opens a TCP connection to that port.
    check = simulator["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    assert "socket.create_connection" in check[3] and f"('127.0.0.1', {port})" in check[3]
    assert f"127.0.0.1:{port}:{port}" in simulator["ports"]
    assert agent["depends_on"]["opcua-simulator"]["condition"] == "service_healthy"


def test_agent_reads_the_opcua_simulator() -> None:
    (source,) = load_agent_config(AGENT_CONFIG, agent_environment()).data_sources
    assert isinstance(source, OpcUaConfig)
    endpoint = urlsplit(source.connection.endpoint)
    command = SERVICES["opcua-simulator"]["command"]
    listen = urlsplit(command[command.index("--endpoint") + 1])
    assert endpoint.hostname == "opcua-simulator" and endpoint.port == (listen.port or 4840)
    # The only security mode the compose simulator offers (it is started without a certificate).
    assert source.connection.security_mode == "None"
    assert "--certificate" not in command
    # Every configured tag is a variable of the simulator, with its well and parameter; all of
    # them are configured; units come from the nodes' EngineeringUnits.
    simulator = load_well_simulator()
    variables = {t.node_id: t for t in simulator.simulated_tags()}
    assert simulator.node_ids() == list(variables)
    configured = {tag.node_id: tag for tag in source.tags}
    assert set(configured) == set(variables)
    for node_id, tag in configured.items():
        variable = variables[node_id]
        assert (tag.well_id, tag.parameter) == (variable.well_id, variable.parameter), node_id
        assert tag.unit is None, f"{node_id}: the node's EngineeringUnits give the unit"
    # Three wells, each with every parameter the agent's simulator makes.
    wells = {tag.well_id for tag in source.tags}
    assert len(wells) == 3
    for well in wells:
        parameters = [t.parameter for t in source.tags if t.well_id == well]
        assert sorted(parameters) == sorted(SIMULATED_PARAMETERS)


def test_agent_config_needs_the_client_credentials() -> None:
    environment = agent_environment()
    del environment["WELLTEGRA_CLIENT_SECRET"]
    with pytest.raises(ValueError, match="WELLTEGRA_CLIENT_SECRET"):
        load_agent_config(AGENT_CONFIG, environment)


def test_traces_go_to_jaeger_over_otlp() -> None:
    jaeger = SERVICES["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    published = {port.rpartition(":")[2] for port in jaeger["ports"]}
    assert {"16686", "4317"} <= published
    for service in ("gateway", "agent"):
        endpoint = urlsplit(SERVICES[service]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (endpoint.hostname, endpoint.port) == ("jaeger", 4317)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_readme_deployment_section_matches_the_files() -> None:
    section = readme_section("Deployment")
    for step in ("cp .env.example .env", "deploy/certs/make-dev-certs.sh", "docker compose up -d"):
        assert step in section
    assert "no Docker engine" in section
    # The images it builds are the ones the compose file runs, from the same Dockerfiles.
    for dockerfile, tag in re.findall(r"docker build -f (\S+) -t (\S+) \.", section):
        services = [s for s in SERVICES.values() if s.get("image") == tag]
        assert services, tag
        assert all(s["build"]["dockerfile"] == dockerfile for s in services)
    # The tenant it creates is the agent's; every repository path it names exists.
    tenant = load_agent_config(AGENT_CONFIG, agent_environment()).tenant.id
    assert f"tenants create {tenant}" in section and f"--tenant {tenant}" in section
    for path in re.findall(r"`((?:deploy|edge|envoy|docs|ingest_service)/[\w./-]+)`", section):
        assert (ROOT / path).exists(), path
    for variable in re.findall(r"\b([A-Z][A-Z_]{3,})\b", section):
        if variable.endswith(("PASSWORD", "_ID", "_SECRET", "_UID")):
            assert variable in env_example(), variable
    grafana_port = next(p for p in SERVICES["grafana"]["ports"]).split(":")[-2]
    prometheus_port = next(p for p in SERVICES["prometheus"]["ports"]).split(":")[-2]
    assert f"http://localhost:{grafana_port}" in section
    assert f"http://localhost:{prometheus_port}" in section
