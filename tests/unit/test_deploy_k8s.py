"""deploy/k8s, checked without a cluster: every document validates against the Kubernetes API
schemas (kubernetes-validate, strict: unknown fields are errors); labels match selectors; every
container has probes, resources and a non-root, read-only security context; ports and file
paths agree with envoy/envoy.yaml and the gateway's configuration; only Envoy reaches the
gateway's gRPC port; a tenant namespace has no egress at all (spec 5.1); the Secrets are
templates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ingest_service.config import load_config
from ingest_service.tenancy import check_tenant_id
from tests.unit.deploy_checks import COMPOSE, ROOT, envoy_gateway_address, envoy_listener

K8S = ROOT / "deploy" / "k8s"
NAMESPACE = "welltegra-ingest"
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}
TEMPLATES = {"secret.example.yaml", "tenant-namespace.yaml"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path | None = None) -> list[dict[str, Any]]:
    paths = [path] if path else manifest_files()
    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def find(kind: str, name: str) -> dict[str, Any]:
    matching = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matching) == 1, f"{kind}/{name}: {len(matching)} documents"
    return matching[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_document_validates_against_the_kubernetes_schemas(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        assert API_VERSIONS.get(doc["kind"]) == doc["apiVersion"], doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_schema_validation_can_fail() -> None:
    service = find("Service", "gateway")
    broken = {**service, "spec": {**service["spec"], "ports": [{"port": "grpc"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_namespaces_and_kustomization() -> None:
    namespaces = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Namespace"}
    assert namespaces[NAMESPACE]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "restricted"
    )
    for doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] in namespaces, doc["metadata"]["name"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    assert resources == {p.name for p in manifest_files()} - TEMPLATES
    assert all((K8S / r).is_file() for r in resources)


def deployments() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == "Deployment"]


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_deployment_is_probed_bounded_and_unprivileged(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]
    template_labels = spec["template"]["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], template_labels)
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    main = container(deployment)
    image, _, tag = main["image"].rpartition(":")
    assert image and tag and "latest" not in tag, main["image"]
    port_names = {p["name"]: p["containerPort"] for p in main["ports"]}
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = main[probe_name]
        (kind,) = set(probe) & {"grpc", "tcpSocket", "httpGet", "exec"}
        port = probe[kind].get("port")
        assert port in port_names or port in port_names.values(), f"{probe_name}: {port}"
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(main["resources"][bound])
    context = main["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"] for v in pod["volumes"]}
    for mount in main["volumeMounts"]:
        assert mount["name"] in volumes


def test_gateway_deployment_matches_its_config_envoy_and_the_image(tmp_path: Path) -> None:
    deployment = find("Deployment", "ingest-gateway")
    main = container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    config_map = find("ConfigMap", "gateway-config")
    config_path = Path(main["args"][main["args"].index("--config") + 1])
    mount = next(m for m in main["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "gateway-config"
    assert config_path.name in config_map["data"]
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(config_map["data"][config_path.name])
    config = load_config(config_file, environ={})
    assert config.token_key_problem() is None and not config.dev
    grpc_port = {p["name"]: p["containerPort"] for p in main["ports"]}["grpc"]
    assert int(config.grpc_listen.rpartition(":")[2]) == grpc_port
    assert config.metrics_listen is not None
    assert {p["name"]: p["containerPort"] for p in main["ports"]}["metrics"] == int(
        config.metrics_listen.rpartition(":")[2]
    )
    # Readiness is the gRPC health of the ingest service; liveness is not (a database outage
    # would restart every pod).
    assert main["readinessProbe"]["grpc"] == {
        "port": grpc_port,
        "service": "welltegra.ingest.v1.IngestService",
    }
    assert "grpc" not in main["livenessProbe"]
    # A read-only root: the data directory is a volume.
    assert str(config.data_dir) in {m["mountPath"] for m in main["volumeMounts"]}
    assert main["image"] == COMPOSE["services"]["gateway"]["image"]
    secret = find("Secret", main["envFrom"][0]["secretRef"]["name"])
    assert set(secret["stringData"]) == {"DATABASE_URL", "REDIS_URL", "WELLTEGRA_MASTER_KEY"}
    # Envoy's cluster dials the Service by name and port.
    address = envoy_gateway_address()
    service = find("Service", address["address"])
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == address["port_value"]]
    assert grpc["targetPort"] == "grpc"
    assert selects(
        service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]
    )


def test_services_select_a_deployment_and_name_its_ports() -> None:
    for service in (d for d in documents() if d["kind"] == "Service"):
        targets = [
            d
            for d in deployments()
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        names = {p["name"] for p in container(targets[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names


def test_envoy_runs_the_repository_envoy_yaml_with_its_files_mounted() -> None:
    deployment = find("Deployment", "envoy")
    main = container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    provided: dict[str, str] = {}  # file path in the container -> ConfigMap or Secret key
    for mount in main["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "subPath" in mount:
            assert volume["configMap"]["name"] == "envoy-config"
            provided[mount["mountPath"]] = mount["subPath"]
        else:
            secret = find("Secret", volume["secret"]["secretName"])
            assert secret["type"] == "kubernetes.io/tls"
            for key in secret["stringData"]:
                provided[f"{mount['mountPath']}/{key}"] = key
    listener = envoy_listener()
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    certificate = tls["tls_certificates"][0]
    needed = {
        main["args"][main["args"].index("--config-path") + 1],
        certificate["certificate_chain"]["filename"],
        certificate["private_key"]["filename"],
    }
    envoy_text = (ROOT / "envoy" / "envoy.yaml").read_text()
    needed |= set(re.findall(r"(?:filename|proto_descriptor): (/etc/envoy/\S+)", envoy_text))
    assert needed <= set(provided), needed - set(provided)
    # The ConfigMap is made from these repository files (the command in envoy.yaml's comment).
    manifest = (K8S / "envoy.yaml").read_text()
    for path, key in provided.items():
        if path.startswith("/etc/envoy/certs/"):
            continue
        source = next(p for p in ("envoy", "gen") if (ROOT / p / key).is_file())
        assert f"--from-file={source}/{key}" in manifest
    port = listener["address"]["socket_address"]["port_value"]
    assert {p["name"]: p["containerPort"] for p in main["ports"]}["https"] == port
    service = find("Service", "envoy")
    (https,) = service["spec"]["ports"]
    assert (https["port"], https["targetPort"]) == (443, "https")


def test_only_envoy_reaches_the_gateway_grpc_port() -> None:
    policy = find("NetworkPolicy", "ingest-gateway-ingress")
    gateway_labels = find("Deployment", "ingest-gateway")["spec"]["template"]["metadata"]["labels"]
    envoy_labels = find("Deployment", "envoy")["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], gateway_labels)
    assert spec["policyTypes"] == ["Ingress"]
    grpc_rules = [
        rule for rule in spec["ingress"] if any(p["port"] == 50051 for p in rule["ports"])
    ]
    assert len(grpc_rules) == 1
    (peer,) = grpc_rules[0]["from"]
    assert set(peer) == {"podSelector"}  # this namespace's pods only
    assert selects(peer["podSelector"]["matchLabels"], envoy_labels)
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every peer"
        assert rule.get("ports"), "a rule without `ports` admits every port"


def test_tenant_namespaces_have_no_egress() -> None:
    path = K8S / "tenant-namespace.yaml"
    (namespace,) = [d for d in documents(path) if d["kind"] == "Namespace"]
    tenant = namespace["metadata"]["labels"]["welltegra.io/tenant"]
    check_tenant_id(tenant)
    assert namespace["metadata"]["name"] == "welltegra-tenant-" + tenant.replace("_", "-")
    (policy,) = [d for d in documents(path) if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == namespace["metadata"]["name"]
    assert policy["spec"]["podSelector"] == {}, "every pod of the namespace"
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert not policy["spec"].get("egress"), "no egress rule: nothing is allowed out"


def test_secrets_are_templates_only() -> None:
    secrets = [d for d in documents() if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"gateway-secrets", "envoy-tls"}
    for secret in secrets:
        assert "data" not in secret, "values in stringData, as placeholders"
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE_ME"), f"{secret['metadata']['name']}.{key}"
    for path in manifest_files():
        if path.name != "secret.example.yaml":
            assert "kind: Secret" not in path.read_text(), path.name
