"""Each gateway's metrics live in a registry of its own."""

from __future__ import annotations

from ingest_service.audit import AuditEvent
from ingest_service.metrics import GatewayMetrics


def test_two_gateways_metrics_do_not_share_values() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.record(
        AuditEvent(action="IngestRealtime", outcome="accepted", tenant_id="t_one", accepted_count=4)
    )
    first.record(AuditEvent(action="Ingest", outcome="refused", reason="invalid_token"))
    first.limits_fallback_active.set(1)
    first.cache_failures.inc()

    labels = {"tenant": "t_one", "rpc": "IngestRealtime", "outcome": "accepted"}
    assert first.registry.get_sample_value("welltegra_gateway_requests_total", labels) == 1
    assert (
        first.registry.get_sample_value(
            "welltegra_gateway_points_total", {"tenant": "t_one", "outcome": "accepted"}
        )
        == 4
    )
    refusal = {"reason": "invalid_token"}
    assert first.registry.get_sample_value("welltegra_gateway_refusals_total", refusal) == 1
    assert first.registry.get_sample_value("welltegra_gateway_limits_fallback_active") == 1

    assert second.registry.get_sample_value("welltegra_gateway_requests_total", labels) is None
    assert second.registry.get_sample_value("welltegra_gateway_refusals_total", refusal) is None
    assert second.registry.get_sample_value("welltegra_gateway_limits_fallback_active") == 0
    assert second.registry.get_sample_value("welltegra_gateway_cache_failures_total") == 0
