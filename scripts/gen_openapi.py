"""Generate gen/openapi.yaml, the OpenAPI 3.1 document of the REST surface, from the proto.

    python scripts/gen_openapi.py [DESCRIPTOR_SET [OUT]]
    # defaults: gen/welltegra_ingest.binpb -> gen/openapi.yaml

`scripts/gen_proto.py` runs this after writing the descriptor set, so `make gen` refreshes the
document and `gen_proto.py --check` reports it stale. Every rpc with a `google.api.http` rule
becomes an operation, and the messages it reaches become schemas in the JSON that Envoy's
grpc_json_transcoder prints (envoy/envoy.yaml): proto field names, the proto3 JSON mapping.
Proto comments become descriptions. What proto cannot say (required fields, limits, the error
body written by envoy/error_body.lua) comes from the constants below and
ingest_service.validation.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from ingest_service.validation import MAX_POINTS, MAX_TEXT, QUALITY_CODES

ROOT = Path(__file__).resolve().parent.parent
TITLE = "WellTegra Ingest REST API"
Schema = dict[str, Any]
F = descriptor_pb2.FieldDescriptorProto

# Proto3 cannot mark a field required. These are required by the gateway's structural
# validation (ingest_service/validation.py: Validator.validate, _point_violations), which
# refuses the whole request without them; tests/unit/test_openapi.py checks the two agree.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "welltegra.ingest.v1.IngestRealtimeRequest": ("data_points",),
    "welltegra.ingest.v1.DataPoint": ("well_id", "timestamp", "parameter_name", "value", "unit"),
}
# Further limits of the same validation, merged into the fields' schemas.
FIELD_LIMITS: dict[str, dict[str, Schema]] = {
    "welltegra.ingest.v1.IngestRealtimeRequest": {
        "data_points": {"minItems": 1, "maxItems": MAX_POINTS},
    },
    "welltegra.ingest.v1.DataPoint": {
        **{name: {"maxLength": limit} for name, limit in MAX_TEXT.items()},
        "quality_code": {"enum": ["", *sorted(QUALITY_CODES)]},
    },
}
# The REST error responses: (status, name, description, the `error` codes sent with it).
# envoy/error_body.lua writes the body from the ErrorInfo reason of the gateway's errors
# (ingest_service/errors.py) or from Envoy's own replies (404, 413, 429, 503).
ERRORS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("400", "ValidationError", "The request is malformed; nothing of it was stored.",
     ("validation_error",)),
    ("401", "InvalidToken", "The bearer token is missing, malformed, expired or untrusted.",
     ("invalid_token",)),
    ("403", "Forbidden", "The token does not grant api:ingest, names another tenant than the "
     "request, or its tenant is not provisioned.",
     ("insufficient_scope", "tenant_mismatch", "unknown_tenant")),
    ("404", "NotFound", "No such route.", ("not_found",)),
    ("413", "PayloadTooLarge", "The request body is larger than 10 MiB.", ("payload_too_large",)),
    ("429", "RateLimitExceeded", "Too many requests; retry after Retry-After seconds.",
     ("rate_limit_exceeded",)),
    ("503", "ServiceUnavailable", "The gateway or its storage is unavailable; retry later, "
     "after Retry-After seconds when given.", ("service_unavailable", "storage_unavailable")),
)  # fmt: skip
RETRY_AFTER_STATUSES = ("429", "503")

_INT32, _UINT32 = {"type": "integer", "format": "int32"}, {"type": "integer", "minimum": 0}
_INT64 = {"type": "string", "format": "int64"}  # JSON strings: int64 exceeds a double
SCALARS: dict[int, Schema] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    **dict.fromkeys((F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32), _INT32),
    **dict.fromkeys((F.TYPE_UINT32, F.TYPE_FIXED32), _UINT32),
    **dict.fromkeys((F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64, F.TYPE_UINT64), _INT64),
    F.TYPE_FIXED64: _INT64,
}
# Well-known types with a JSON form of their own; other google.protobuf types are refused.
WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d{1,9})?s$"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.Empty": {"type": "object"},
}


def comment(file: descriptor_pb2.FileDescriptorProto, path: tuple[int, ...]) -> str:
    """The leading comment at `path` in the file's SourceCodeInfo, without the `// ` marks."""
    for location in file.source_code_info.location:
        if tuple(location.path) == path and location.leading_comments:
            lines = location.leading_comments.strip("\n").split("\n")
            return "\n".join(line.removeprefix(" ").rstrip() for line in lines).strip()
    return ""


def described(schema: Schema, text: str) -> Schema:
    return {**schema, "description": text} if text else schema


class Builder:
    """Collects the schemas of the messages and enums reached from the annotated rpcs."""

    def __init__(self, fds: descriptor_pb2.FileDescriptorSet) -> None:
        # full name -> (descriptor, its file, its SourceCodeInfo path)
        self.types: dict[str, tuple[Any, Any, tuple[int, ...]]] = {}
        for file in fds.file:
            self._index(file, file.package, file, ())
        self.schemas: dict[str, Schema] = {}

    def _index(self, file: Any, scope: str, parent: Any, path: tuple[int, ...]) -> None:
        nested = bool(path)  # field numbers of message_type/enum_type differ when nested
        for i, enum in enumerate(parent.enum_type):
            self.types[f"{scope}.{enum.name}"] = (enum, file, (*path, 4 if nested else 5, i))
        for i, message in enumerate(parent.nested_type if nested else parent.message_type):
            here = (*path, 3 if nested else 4, i)
            self.types[f"{scope}.{message.name}"] = (message, file, here)
            self._index(file, f"{scope}.{message.name}", message, here)

    def ref(self, full_name: str) -> Schema:
        """A reference to the schema of `full_name`, built on first use."""
        if full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[full_name])
        if full_name.startswith("google.protobuf."):
            sys.exit(f"gen_openapi: no JSON schema for {full_name}; add it to WELL_KNOWN")
        descriptor, file, path = self.types[full_name]
        name = full_name.removeprefix(f"{file.package}.")
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder, so a recursive message stops here
            if isinstance(descriptor, descriptor_pb2.EnumDescriptorProto):
                schema: Schema = {"type": "string", "enum": [v.name for v in descriptor.value]}
            else:
                schema = self._message(full_name, descriptor, file, path)
            self.schemas[name] = described(schema, comment(file, path))
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, full_name: str, message: Any, file: Any, path: tuple[int, ...]) -> Schema:
        limits = FIELD_LIMITS.get(full_name, {})
        properties = {
            field.name: described(
                {**self.field(field), **limits.get(field.name, {})}, comment(file, (*path, 2, i))
            )
            for i, field in enumerate(message.field)
        }
        schema: Schema = {"type": "object", "properties": properties}
        if required := [name for name in REQUIRED_FIELDS.get(full_name, ()) if name in properties]:
            schema["required"] = required
        return schema

    def field(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        """The JSON schema of one field: scalar, enum or message, repeated or a map."""
        name = field.type_name[1:]
        if field.type == F.TYPE_MESSAGE and (entry := self.types[name][0]).options.map_entry:
            return {"type": "object", "additionalProperties": self.field(entry.field[1])}
        if field.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
            schema = self.ref(name)
        else:
            schema = dict(SCALARS[field.type])
        return {"type": "array", "items": schema} if field.label == F.LABEL_REPEATED else schema

    def operation(self, method: Any, rule: http_pb2.HttpRule, path: str, text: str) -> Schema:
        """The operation of one http binding of `method`."""
        in_path = re.findall(r"\{([\w.]+)\}", path)
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in in_path
        ]
        if not rule.body:  # the request's other scalar fields are query parameters
            fields = self.types[method.input_type[1:]][0].field
            params += [
                {"name": field.name, "in": "query", "schema": self.field(field)}
                for field in fields
                if field.name not in in_path and field.type != F.TYPE_MESSAGE
            ]
        operation: Schema = {"operationId": method.name}
        if text:
            operation["summary"] = " ".join(text.split()).split(". ")[0].rstrip(".")
            operation["description"] = text
        if params:
            operation["parameters"] = params
        if rule.body:
            body = json_content(self.ref(method.input_type[1:]))
            operation["requestBody"] = {"required": True, "content": body}
        operation["responses"] = {
            "200": {"description": "OK", "content": json_content(self.ref(method.output_type[1:]))},
            **{status: {"$ref": f"#/components/responses/{name}"} for status, name, *_ in ERRORS},
        }
        return operation


def json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def bindings(method: Any) -> list[tuple[str, str, http_pb2.HttpRule]]:
    """(HTTP method, OpenAPI path, rule) of the method's http rule and additional bindings."""
    raw = method.options.SerializeToString()  # re-parsed, so the http extension is read
    rule = descriptor_pb2.MethodOptions.FromString(raw).Extensions[annotations_pb2.http]
    found = []
    for binding in (rule, *rule.additional_bindings) if rule.WhichOneof("pattern") else ():
        verb = binding.WhichOneof("pattern")
        if verb == "custom" or binding.body not in ("*", ""):
            sys.exit(f'gen_openapi: {method.name}: only standard verbs and body "*" or none')
        path = re.sub(r"\{([\w.]+)=[^}]*\}", r"{\1}", getattr(binding, verb))
        found.append((verb, path, binding))
    return found


def error_components() -> tuple[Schema, Schema]:
    """The shared Error schema, and one response per documented error status."""
    seconds = {"type": "integer", "minimum": 1}
    responses: Schema = {}
    for status, name, text, codes in ERRORS:
        listed = ", ".join(f"`{code}`" for code in codes)
        responses[name] = {
            "description": f"{text} `error`: {listed}.",
            "content": json_content({"$ref": "#/components/schemas/Error"}),
        }
        if status in RETRY_AFTER_STATUSES:
            header = {"description": "Seconds to wait before retrying.", "schema": seconds}
            responses[name]["headers"] = {"Retry-After": header}
    detail = {
        "type": "object",
        "properties": {
            "field": {"type": "string", "description": "The field at fault: data_points[3].unit."},
            "error": {"type": "string", "description": "What is wrong with it."},
        },
        "required": ["field", "error"],
    }
    error = {
        "description": "The body of every REST error response.",
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "The error code, e.g. validation_error."},
            "message": {"type": "string", "description": "What went wrong, for a person."},
            "details": {"type": "array", "items": detail, "description": "The fields at fault."},
            "retry_after_seconds": {"description": "As the Retry-After header.", **seconds},
        },
        "required": ["error", "message"],
    }
    return error, responses


def build(fds: descriptor_pb2.FileDescriptorSet) -> Schema:
    """The OpenAPI document of every http-annotated rpc in `fds`."""
    builder = Builder(fds)
    paths: dict[str, Schema] = {}
    info: Schema = {"title": TITLE, "version": "v1"}
    tags: list[Schema] = []
    for file in fds.file:
        for s, service in enumerate(file.service):
            served = False
            for m, method in enumerate(service.method):
                for i, (verb, path, rule) in enumerate(bindings(method)):
                    operation = builder.operation(method, rule, path, comment(file, (6, s, 2, m)))
                    operation["operationId"] += f"_{i + 1}" if i else ""
                    paths.setdefault(path, {})[verb] = {"tags": [service.name], **operation}
                    served = True
            if served:
                tags.append(described({"name": service.name}, comment(file, (6, s))))
                version = file.package.rsplit(".")[-1]  # and the comment above `syntax`:
                info = described({"title": TITLE, "version": version}, comment(file, (12,)))
    error, responses = error_components()
    if "Error" in builder.schemas:
        sys.exit("gen_openapi: a proto message named Error clashes with the error body schema")
    scheme = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT that grants the scope api:ingest and names the tenant.",
    }
    return {
        "openapi": "3.1.0",
        "info": info,
        "tags": tags,
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted({**builder.schemas, "Error": error}.items())),
            "responses": responses,
            "securitySchemes": {"bearerAuth": scheme},
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line text as literal blocks, so comments stay readable; no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _Dumper.represent_str)


def render(descriptor_set: bytes) -> str:
    """The YAML text of the document: the same descriptor set always gives the same text."""
    document = build(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set))
    text = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return "# Generated from proto/ by scripts/gen_openapi.py (`make gen`); do not edit.\n" + text


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else ROOT / "gen" / "welltegra_ingest.binpb"
    target = Path(argv[1]) if len(argv) > 1 else ROOT / "gen" / "openapi.yaml"
    target.write_text(render(source.read_bytes()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
