"""gen/openapi.yaml: a valid OpenAPI document of the REST surface, current with proto/."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2

from ingest_service.errors import GatewayError, InvalidRequest
from ingest_service.parameters import ParameterRegistry
from ingest_service.validation import MAX_POINTS, Validator
from welltegra.ingest.v1 import ingest_pb2

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "gen" / "openapi.yaml"
PACKAGE = "welltegra.ingest.v1"
ROUTE = "/v1/ingest/realtime"
ERROR_STATUSES = ("400", "401", "403", "404", "413", "429", "503")


def _load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py (not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_openapi = _load_script("gen_openapi")


@pytest.fixture(scope="module")
def fresh_descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """proto/ compiled now, as `make gen` compiles it: newer than gen/ if gen/ is stale."""
    path = tmp_path_factory.mktemp("descriptors") / "fresh.binpb"
    _load_script("gen_proto").write_descriptor_set(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def proto_messages(fresh_descriptor_set: bytes) -> dict[str, descriptor_pb2.DescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(fresh_descriptor_set)
    contract = next(f for f in fds.file if f.package == PACKAGE)
    return {message.name: message for message in contract.message_type}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _schema(document: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/components/schemas/"), ref
    schema: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_committed_document_is_what_the_generator_writes_now(fresh_descriptor_set: bytes) -> None:
    committed = OPENAPI.read_text(encoding="utf-8")
    assert gen_openapi.render(fresh_descriptor_set) == committed, "stale; run `make gen`"
    # Deterministic: the committed descriptor set renders to the same bytes, every time.
    descriptor_set = (ROOT / "gen" / "welltegra_ingest.binpb").read_bytes()
    assert gen_openapi.render(descriptor_set) == gen_openapi.render(descriptor_set) == committed


def test_document_is_valid_openapi(document: dict[str, Any]) -> None:
    try:
        from openapi_spec_validator import validate  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # not a dependency of the project: fall back to the checks below
        pass
    else:
        validate(document)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    assert document["paths"], "no operations"
    for ref in set(_refs(document)):
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in document["components"][section], f"dangling {ref}"
    operation_ids = [
        op["operationId"] for item in document["paths"].values() for op in item.values()
    ]
    assert len(operation_ids) == len(set(operation_ids))


def test_realtime_route(document: dict[str, Any]) -> None:
    operation = document["paths"][ROUTE]["post"]
    assert operation["operationId"] == "IngestRealtime"
    assert "1,000 points" in operation["description"]  # from the rpc's comment
    body = operation["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/IngestRealtimeRequest"
    }
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/IngestRealtimeResponse"}
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert "api:ingest" in scheme["description"]
    assert document["security"] == [{"bearerAuth": []}]


def test_schemas_have_exactly_the_proto_fields(
    document: dict[str, Any], proto_messages: dict[str, descriptor_pb2.DescriptorProto]
) -> None:
    schemas = document["components"]["schemas"]
    for name in ("IngestRealtimeRequest", "IngestRealtimeResponse", "DataPoint", "Rejection"):
        fields = [field.name for field in proto_messages[name].field]
        assert list(schemas[name]["properties"]) == fields, f"{name}: run `make gen`"
    # Every schema but the error body is a message of the contract.
    assert set(schemas) - {"Error"} <= set(proto_messages)


def test_fields_follow_the_proto3_json_mapping(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    response = schemas["IngestRealtimeResponse"]["properties"]
    for count in ("accepted_count", "rejected_count", "duplicate_count", "processing_time_ms"):
        assert response[count]["type"] == "integer" and response[count]["format"] == "int32"
    assert response["rejections"]["items"] == {"$ref": "#/components/schemas/Rejection"}
    assert schemas["Rejection"]["properties"]["index"]["type"] == "integer"

    request = schemas["IngestRealtimeRequest"]
    points = request["properties"]["data_points"]
    assert points["type"] == "array"
    assert points["items"] == {"$ref": "#/components/schemas/DataPoint"}
    assert (points["minItems"], points["maxItems"]) == (1, MAX_POINTS)
    assert request["required"] == ["data_points"]
    timestamp = {"type": "string", "format": "date-time"}
    assert request["properties"]["ingestion_timestamp"].items() >= timestamp.items()

    point = schemas["DataPoint"]
    assert point["properties"]["timestamp"].items() >= timestamp.items()
    assert point["properties"]["value"]["type"] == "number"
    assert point["properties"]["well_id"]["maxLength"] == 128
    assert "the same point sent" in point["description"]  # from the message's comment
    assert "RFC 3339" in point["properties"]["timestamp"]["description"]  # a field's comment


def test_required_fields_are_the_ones_validation_requires(document: dict[str, Any]) -> None:
    """The schema's `required` (not expressible in proto) agrees with the gateway's checks."""
    validator = Validator(ParameterRegistry(), future_tolerance=timedelta(minutes=5))
    required = set(document["components"]["schemas"]["DataPoint"]["required"])
    for field in ingest_pb2.DataPoint.DESCRIPTOR.fields:
        point = ingest_pb2.DataPoint(
            well_id="WELL_001", parameter_name="wellhead_pressure", value=100.0, unit="bar"
        )
        point.timestamp.GetCurrentTime()
        point.ClearField(field.name)
        try:
            validator.validate([point])
            violations: set[tuple[str, str]] = set()
        except InvalidRequest as refusal:
            violations = {(v.field, v.description) for v in refusal.violations}
        missing = (f"data_points[0].{field.name}", "is required") in violations
        assert missing == (field.name in required), field.name
    with pytest.raises(InvalidRequest) as empty:
        validator.validate([])
    assert [v.field for v in empty.value.violations] == ["data_points"]


def test_every_documented_error_response_is_present(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "message"}
    properties = error["properties"]
    assert set(properties) == {"error", "message", "details", "retry_after_seconds"}
    assert properties["retry_after_seconds"]["type"] == "integer"
    assert properties["details"]["items"]["required"] == ["field", "error"]

    documented = ""
    responses = document["paths"][ROUTE]["post"]["responses"]
    for status in ERROR_STATUSES:
        ref = responses[status]["$ref"]
        response = document["components"]["responses"][ref.rsplit("/", 1)[1]]
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, status
        documented += response["description"]
        if status == "429":
            assert response["headers"]["Retry-After"]["schema"]["type"] == "integer"

    # Every reason the gateway sends is documented under some status.
    def reasons(cls: type[GatewayError]) -> set[str]:
        return {cls.reason}.union(*(reasons(sub) for sub in cls.__subclasses__()))

    for reason in reasons(GatewayError) - {GatewayError.reason}:
        assert f"`{reason}`" in documented, reason
    for code in ("not_found", "payload_too_large", "rate_limit_exceeded", "service_unavailable"):
        assert f"`{code}`" in documented, code
