"""What the deployment tests share: the metrics the two processes export, and a PromQL check that
an expression parses, type-checks and names only those metrics and their labels.

The metric names come from the code itself (``AgentMetrics`` and ``GatewayMetrics`` registries),
so a renamed metric fails the alert rules and the dashboard that still use the old name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENVOY: dict[str, Any] = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())

# Series Prometheus makes itself for every target.
BUILTIN_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
# Suffixes of the series one metric family exposes, by its type.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Series name -> its label names, for every series the agent and the gateway export."""
    from edge.metrics import AgentMetrics
    from ingest_service.metrics import GatewayMetrics

    series: dict[str, frozenset[str]] = dict(BUILTIN_SERIES)
    for registry in (AgentMetrics("t").registry, GatewayMetrics().registry):
        # prometheus_client keeps each collector's label names on the collector only.
        for collector in list(registry._collector_to_names):
            labels = frozenset(getattr(collector, "_labelnames", ()))
            for family in collector.describe():
                for suffix in _SUFFIXES.get(family.type, ("",)):
                    extra = {"le"} if suffix == "_bucket" else set()
                    series[family.name + suffix] = labels | extra
    return series


@cache
def target_labels() -> frozenset[str]:
    """Labels Prometheus adds to every series it scrapes (deploy/prometheus/prometheus.yml)."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    labels = {"job", "instance"}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            labels |= set(static.get("labels", {}))
    return frozenset(labels)


@dataclass
class PromQLReport:
    """What one expression refers to."""

    series: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _name_regex_expansions(pattern: str) -> list[str]:
    """``a_(b|c)_d`` -> [a_b_d, a_c_d]; any other regex is returned as is."""
    match = re.fullmatch(r"([\w:]*)\(([\w:|]+)\)([\w:]*)", pattern)
    if match is None:
        return [pattern]
    head, alternatives, tail = match.groups()
    return [head + alternative + tail for alternative in alternatives.split("|")]


def check_promql(expr: str) -> PromQLReport:
    """Parse ``expr`` (with Grafana's interval variables replaced) and list what is wrong: a
    syntax or type error, a series nobody exports, a label no referenced series carries."""
    report = PromQLReport()
    text = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
    try:
        tree = promql_parser.parse(text)
    except ValueError as exc:
        report.problems.append(f"does not parse: {exc}")
        return report
    known = exported_series()
    grouping: set[str] = set()
    matcher_labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names = [node.name] if node.name else []
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    if matcher.op == promql_parser.MatchOp.Re:
                        names += _name_regex_expansions(matcher.value)
                    else:
                        names.append(matcher.value)
                else:
                    matcher_labels.add(matcher.name)
            for name in names:
                if name not in known:
                    report.problems.append(f"no process exports the series {name}")
                report.series.add(name)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            if matching is not None:
                grouping.update(matching.labels)

    promql_parser.walk(tree, visit)
    carried = set(target_labels())
    for name in report.series:
        carried |= known.get(name, frozenset())
    for label in sorted((grouping | matcher_labels) - carried):
        report.problems.append(f"label {label!r} is on none of {sorted(report.series)}")
    return report


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item["name"] == name)


def envoy_listener() -> dict[str, Any]:
    """envoy/envoy.yaml's one listener."""
    return named(ENVOY["static_resources"]["listeners"], "ingress")


def envoy_gateway_address() -> dict[str, Any]:
    """The address Envoy dials the gateway at: {"address": host, "port_value": port}."""
    cluster = named(ENVOY["static_resources"]["clusters"], "ingest_gateway")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    address: dict[str, Any] = endpoint["address"]["socket_address"]
    return address
