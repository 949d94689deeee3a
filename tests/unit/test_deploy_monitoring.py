"""deploy/prometheus and deploy/grafana, checked without a running Prometheus or Grafana.

- The alert rules pass ``promtool check rules`` and behave as documented under
  ``promtool test rules`` (series in, alerts out), with the real promtool: from PATH, else from
  Debian's ``prometheus`` package (``apt-get download``, unpacked under build/tools/). Only where
  neither can be had are those two tests skipped.
- Every expression of the rules and of the dashboard parses, type-checks, and names only series
  and labels that edge/metrics.py and ingest_service/metrics.py export (deploy_checks).
- Every alert has a duration, a severity, a summary, a description and a runbook section in
  docs/operations.md; the scrape targets and Grafana's provisioning agree with docker-compose.yml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.unit.deploy_checks import COMPOSE, ROOT, check_promql, exported_series

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS: dict[str, Any] = yaml.safe_load(ALERTS_FILE.read_text())
SCRAPE: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
DASHBOARD: dict[str, Any] = json.loads((ROOT / "deploy" / "grafana" / "ingestion.json").read_text())
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()

PROMTOOL_CACHE = ROOT / "build" / "tools" / "promtool"
SPEC_ALERTS = {"IngestionAgentDown", "HighBufferBacklog", "HighAPIErrorRate"}
OPERATOR_ALERTS = {
    "BufferOldestBatchAgeHigh",
    "BufferOldestBatchAgeCritical",
    "DataPointsDeadLettered",
    "DataPointsDropped",
    "CollectorDown",
    "IngestGatewayDown",
    "GatewayServerErrors",
    "GatewayStorageLatencyHigh",
    "GatewayLimitsFallbackActive",
}


def rules() -> list[dict[str, Any]]:
    return [rule for group in ALERTS["groups"] for rule in group["rules"]]


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in DASHBOARD["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


# -- promtool -------------------------------------------------------------------------------


def _fetch_promtool(destination: Path) -> str | None:
    """Unpack promtool from Debian's prometheus package; None, or why it cannot be had."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return "no apt-get/dpkg-deb (not a Debian machine)"
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)

        def download() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["apt-get", "download", "prometheus"],
                cwd=work, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip

        result = download()
        if result.returncode != 0 and os.geteuid() == 0:
            # A new machine may not have the package lists yet.
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, check=False)
            result = download()
        packages = list(work.glob("prometheus_*.deb"))
        if result.returncode != 0 or not packages:
            return f"apt-get download prometheus failed: {result.stderr.strip()[-300:]}"
        subprocess.run(["dpkg-deb", "-x", str(packages[0]), str(work / "x")], check=True)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_suffix(".partial")
        shutil.copy2(work / "x" / "usr" / "bin" / "promtool", partial)
        partial.replace(destination)
    return None


@pytest.fixture(scope="module")
def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    if not PROMTOOL_CACHE.exists():
        reason = _fetch_promtool(PROMTOOL_CACHE)
        if reason is not None:
            pytest.skip(f"promtool cannot be installed here: {reason}")
    return PROMTOOL_CACHE


def run_promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules_and_the_scrape_config(promtool: Path) -> None:
    checked = run_promtool(promtool, "check", "rules", str(ALERTS_FILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    config = run_promtool(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_accepts_the_dashboard_queries(promtool: Path, tmp_path: Path) -> None:
    # As recording rules, so promtool parses them; Grafana's variables become what they select.
    recorded = [
        {
            "record": f"dashboard:query_{index}",
            "expr": re.sub(r"\$__(rate_)?interval", "5m", expr)
            .replace("$agent_job", ".*")
            .replace("$gateway_job", ".*"),
        }
        for index, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    checked = run_promtool(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def series(name: str, job: str = "ingestion-agent", **labels: str) -> str:
    instance = labels.pop("instance", "agent:9090" if job == "ingestion-agent" else "gw:9464")
    pairs = {"job": job, "instance": instance, **labels}
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"


GIB = 1024**3
AGENT = {"job": "ingestion-agent", "instance": "agent:9090"}
GATEWAY = {"job": "ingest-gateway", "instance": "gw:9464"}

# (alert, input series {series: values}, [(eval time, [expected labels of each firing alert])]).
# Values are promtool's notation at one sample a minute: "a+bxn" is a, a+b, ... (n+1 samples),
# "_" a missing sample.
BEHAVIOUR: list[tuple[str, dict[str, str], list[tuple[str, list[dict[str, str]]]]]] = [
    (
        "IngestionAgentDown",
        {series("up"): "1 1 0x10", series("up", instance="other:9090"): "1x12"},
        [("5m", []), ("8m", [{**AGENT, "severity": "critical"}])],
    ),
    (
        "HighBufferBacklog",
        {
            series("ingestion_buffer_size_bytes", tenant_id="t"): f"{6 * GIB}x40",
            series("ingestion_buffer_size_bytes", tenant_id="t", instance="b"): f"{4 * GIB}x40",
        },
        [("20m", []), ("35m", [{**AGENT, "tenant_id": "t", "severity": "warning"}])],
    ),
    (
        "HighAPIErrorRate",
        {
            # 1 refused in 11: fires.
            series("ingestion_data_points_sent_total", tenant_id="t"): "0+600x30",
            series("ingestion_data_points_failed_total", tenant_id="t"): "0+60x30",
            # Everything refused, and no point ever acknowledged (no sent series): fires.
            series("ingestion_data_points_failed_total", tenant_id="t", instance="b"): "0+60x30",
            # 1 refused in 101: quiet.
            series("ingestion_data_points_sent_total", tenant_id="t", instance="c"): "0+600x30",
            series("ingestion_data_points_failed_total", tenant_id="t", instance="c"): "0+6x30",
        },
        [
            ("10m", []),
            (
                "25m",
                [
                    {**AGENT, "tenant_id": "t", "severity": "warning"},
                    {**AGENT, "instance": "b", "tenant_id": "t", "severity": "warning"},
                ],
            ),
        ],
    ),
    (
        "BufferOldestBatchAgeHigh",
        {series("ingestion_buffer_oldest_age_seconds", tenant_id="t"): "0 0 2000x20"},
        [("5m", []), ("10m", [{**AGENT, "tenant_id": "t", "severity": "warning"}])],
    ),
    (
        "BufferOldestBatchAgeCritical",
        {
            series("ingestion_buffer_oldest_age_seconds", tenant_id="t"): "2000x20",
            series("ingestion_buffer_oldest_age_seconds", tenant_id="t", instance="b"): "90000x20",
        },
        [("10m", [{**AGENT, "instance": "b", "tenant_id": "t", "severity": "critical"}])],
    ),
    (
        "DataPointsDropped",
        {
            # The series is born with its first drop, at 5m: increase() alone cannot see it,
            # its _created series (the time of that first increment) can.
            series("ingestion_data_points_dropped_total", tenant_id="t", reason="size_cap"): (
                "_x5 500x40"
            ),
            series("ingestion_data_points_dropped_created", tenant_id="t", reason="size_cap"): (
                "_x5 300x40"
            ),
            # A counter that grows at 21m.
            series("ingestion_data_points_dropped_total", tenant_id="t", reason="retention"): (
                "0x20 100x25"
            ),
            series("ingestion_data_points_dropped_created", tenant_id="t", reason="retention"): (
                "0x45"
            ),
            # Drops of long ago, none since: quiet.
            series(
                "ingestion_data_points_dropped_total",
                tenant_id="t",
                reason="retention",
                instance="b",
            ): "7x45",
            series(
                "ingestion_data_points_dropped_created",
                tenant_id="t",
                reason="retention",
                instance="b",
            ): "-86400x45",
        },
        [
            ("4m", []),
            ("8m", [{**AGENT, "tenant_id": "t", "reason": "size_cap", "severity": "critical"}]),
            ("25m", [{**AGENT, "tenant_id": "t", "reason": "retention", "severity": "critical"}]),
            ("40m", []),
        ],
    ),
    (
        "DataPointsDeadLettered",
        {
            series("ingestion_data_points_dead_lettered_total", tenant_id="t"): "_x5 1000x30",
            series("ingestion_data_points_dead_lettered_created", tenant_id="t"): "_x5 300x30",
        },
        [("4m", []), ("8m", [{**AGENT, "tenant_id": "t", "severity": "warning"}]), ("30m", [])],
    ),
    (
        "CollectorDown",
        {
            series("ingestion_collector_up", source="demo_wells"): "1 0x10",
            series("ingestion_collector_up", source="historian"): "1x10",
        },
        [("4m", []), ("8m", [{**AGENT, "source": "demo_wells", "severity": "warning"}])],
    ),
    (
        "IngestGatewayDown",
        {series("up", job="ingest-gateway"): "0x10"},
        [("1m", []), ("3m", [{**GATEWAY, "severity": "critical"}])],
    ),
    (
        "GatewayServerErrors",
        {
            series(
                "welltegra_gateway_refusals_total",
                job="ingest-gateway",
                reason="storage_unavailable",
            ): "0+60x30",
            # A client's fault, not the gateway's: quiet.
            series(
                "welltegra_gateway_refusals_total",
                job="ingest-gateway",
                reason="rate_limit_exceeded",
            ): "0+600x30",
        },
        [
            ("3m", []),
            ("15m", [{**GATEWAY, "reason": "storage_unavailable", "severity": "critical"}]),
        ],
    ),
    (
        "GatewayStorageLatencyHigh",
        {
            **{
                series("welltegra_gateway_storage_seconds_bucket", job="ingest-gateway", le=le): (
                    "0x30" if le in ("0.5", "1.0") else "0+60x30"
                )
                for le in ("0.5", "1.0", "2.5", "+Inf")
            },
        },
        [("10m", []), ("20m", [{**GATEWAY, "severity": "warning"}])],
    ),
    (
        "GatewayLimitsFallbackActive",
        {series("welltegra_gateway_limits_fallback_active", job="ingest-gateway"): "0 0 1x10"},
        [("5m", []), ("8m", [{**GATEWAY, "severity": "warning"}])],
    ),
]


def test_every_alert_has_behaviour_cases() -> None:
    assert {alert for alert, _, _ in BEHAVIOUR} == {rule["alert"] for rule in rules()}


def test_alerts_fire_when_they_should_and_only_then(promtool: Path, tmp_path: Path) -> None:
    # Annotations are checked by promtool check rules and the tests below; promtool test rules
    # compares them whole, so this copy of the rules has none.
    bare = yaml.safe_load(ALERTS_FILE.read_text())
    for group in bare["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(bare))
    tests = []
    for alert, inputs, expectations in BEHAVIOUR:
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in inputs.items()],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": labels} for labels in firing],
                    }
                    for at, firing in expectations
                ],
            }
        )
    test_path = tmp_path / "alerts_test.yml"
    test_path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests}
        )
    )
    result = run_promtool(promtool, "test", "rules", str(test_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- the rules, without promtool ------------------------------------------------------------


def test_the_spec_and_operator_alerts_are_all_there() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) == SPEC_ALERTS | OPERATOR_ALERTS


def _heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_alert_rule_is_complete_and_names_real_metrics(rule: dict[str, Any]) -> None:
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
    promql_parser.parse_duration(rule["for"])  # raises on "5 min", "", ...
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["runbook_url"] == f"docs/operations.md#{rule['alert'].lower()}"
    anchors = _heading_anchors(OPERATIONS)
    assert "alerts" in anchors, "docs/operations.md has no Alerts section"
    assert rule["alert"].lower() in anchors, f"docs/operations.md has no ### {rule['alert']}"

    report = check_promql(rule["expr"])
    assert not report.problems, report.problems
    assert report.series, "the expression names no series"
    # A template may name only labels the alert can carry.
    carried = {"job", "instance", "site"}
    for name in report.series:
        carried |= exported_series()[name]
    for text in (annotations["summary"], annotations["description"]):
        assert text.count("{{") == text.count("}}")
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in carried - {"le"}, f"{label} is not a label of {report.series}"


def test_the_spec_alerts_keep_their_meaning() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert by_name["IngestionAgentDown"]["expr"].strip() == 'up{job="ingestion-agent"} == 0'
    assert by_name["IngestionAgentDown"]["labels"]["severity"] == "critical"
    assert by_name["IngestionAgentDown"]["for"] == "5m"
    assert (
        "ingestion_buffer_size_bytes > 5 * 1024 * 1024 * 1024"
        in by_name["HighBufferBacklog"]["expr"]
    )
    assert by_name["HighBufferBacklog"]["for"] == "30m"
    error_rate = by_name["HighAPIErrorRate"]
    # A ratio of points now, not the spec's points per second compared with 0.05.
    assert "/" in error_rate["expr"] and error_rate["expr"].rstrip().endswith("> 0.05")
    assert error_rate["for"] == "10m"


def test_the_scrape_jobs_match_the_alerts_and_the_compose_services() -> None:
    jobs = {job["job_name"]: job for job in SCRAPE["scrape_configs"]}
    assert set(jobs) == {"ingestion-agent", "ingest-gateway"}
    text = ALERTS_FILE.read_text()
    for name in jobs:
        assert f'job="{name}"' in text
    for name, service, port in (
        ("ingestion-agent", "agent", _agent_metrics_port()),
        ("ingest-gateway", "gateway", _gateway_metrics_port()),
    ):
        targets = [t for static in jobs[name]["static_configs"] for t in static["targets"]]
        assert targets == [f"{service}:{port}"]
        assert service in COMPOSE["services"]
        assert str(port) in COMPOSE["services"][service]["expose"]
    assert [(PROMETHEUS_DIR / f) for f in SCRAPE["rule_files"]] == [ALERTS_FILE]
    prometheus = COMPOSE["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def _agent_metrics_port() -> int:
    config = yaml.safe_load((ROOT / "deploy" / "agent" / "config.yaml").read_text())
    return int(config["monitoring"]["prometheus_metrics_port"])


def _gateway_metrics_port() -> int:
    config = yaml.safe_load((ROOT / "deploy" / "gateway.compose.yaml").read_text())
    return int(config["metrics_listen"].rpartition(":")[2])


# -- the dashboard --------------------------------------------------------------------------


def test_dashboard_is_a_grafana_model_with_a_datasource_variable() -> None:
    assert DASHBOARD["schemaVersion"] >= 36
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable.startswith("__") or variable in variables, variable


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_query_names_real_metrics(expr: str) -> None:
    report = check_promql(expr)
    assert not report.problems, report.problems


def _panel(title: str) -> str:
    matching = [p for p in panels() if p["title"] == title]
    assert matching, f"no panel {title!r}"
    return " ".join(target["expr"] for target in matching[0]["targets"])


def test_dashboard_has_the_spec_queries_and_the_operator_panels() -> None:
    # The spec's four (section 6.1), with Grafana's interval and the job variable.
    assert "rate(ingestion_data_points_sent_total" in _panel("Ingestion rate")
    assert "ingestion_buffer_size_bytes" in _panel("Buffer backlog")
    assert "/ (1024 * 1024)" in _panel("Buffer backlog")
    assert "ingestion_data_points_failed_total" in _panel("API error rate")
    latency = _panel("API latency p95")
    assert "histogram_quantile(0.95" in latency
    assert "ingestion_api_request_duration_seconds_bucket" in latency
    # What an operator adds.
    assert "ingestion_buffer_oldest_age_seconds" in _panel("Oldest unacknowledged batch")
    lost = _panel("Dropped and dead-lettered points")
    assert "ingestion_data_points_dropped_total" in lost
    assert "ingestion_data_points_dead_lettered_total" in lost
    end_to_end = _panel("End-to-end latency p99 by lane")
    assert "histogram_quantile(0.99" in end_to_end and "lane" in end_to_end
    assert "sum by (outcome)" in _panel("Points by outcome")
    assert "welltegra_gateway_storage_seconds_bucket" in _panel("Storage latency")


def test_grafana_provisioning_matches_the_compose_service() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in COMPOSE["services"] and port == "9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "welltegra.yaml").read_text())
    (provider,) = providers["providers"]
    grafana = COMPOSE["services"]["grafana"]
    mounted = {
        volume.split(":")[1]: volume.split(":")[0]
        for volume in grafana["volumes"]
        if volume.startswith("./")
    }
    assert mounted["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboard_target = next(t for t, s in mounted.items() if s == "./deploy/grafana/ingestion.json")
    assert str(Path(dashboard_target).parent) == provider["options"]["path"]
