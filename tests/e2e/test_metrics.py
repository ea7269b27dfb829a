"""Every process of a running suite serves Prometheus metrics that move.

Each service, the audit ingester and Envoy is scraped before and after a
round of requests: gRPC requests by method and code, their latency
histograms, model calls, auth decisions and quota denials, audit ingest
lag, and Envoy's own stats. No series carries a key, an organization or
request content.
"""

import socket
import time
import urllib.error
import urllib.request

import pytest

from services.common import metrics
from services.common.config import ConfigError, Environment
from tests.e2e.fault_load import (
    AUDIT_PAGE_PATH,
    REVIEW_PATH,
    RULES_ONLY,
    WITH_MODEL,
    SlowModelServer,
    metrics_text,
    sample_sum,
    scrape,
    scrape_when_up,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

CHILDREN = ("auth", "cds", "audit", "billing", "audit-ingest", "envoy")
FREE_DAILY_LIMIT = 100
INGEST_WAIT = 30.0
# Seconds between Envoy's active health checks of each service.
HEALTH_CHECK_SECONDS = 2.0


@pytest.fixture(scope="module")
def exercised():
    """A suite, its metrics before and after a round of requests, and the
    organizations that sent them."""
    with SlowModelServer(delay=0.05) as model:
        with own_stack(ollama_host=model.url) as stack:
            before = {
                name: scrape_when_up(stack.metrics_ports[name])
                for name in CHILDREN
            }
            started = time.monotonic()
            edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
            pro = Organization(stack, "pro")
            free = Organization(stack, "free")
            key = {"x-api-key": pro.api_key}
            statuses = [
                edge.request("POST", REVIEW_PATH, RULES_ONLY, key).status,
                edge.request("POST", REVIEW_PATH, WITH_MODEL, key).status,
                edge.request("GET", AUDIT_PAGE_PATH, None, key).status,
                edge.request("GET", "/v1/billing/usage", None, key).status,
            ]
            free_statuses = [
                edge.request(
                    "POST",
                    REVIEW_PATH,
                    RULES_ONLY,
                    {"x-api-key": free.api_key},
                ).status
                for _ in range(FREE_DAILY_LIMIT + 1)
            ]
            deadline = time.monotonic() + INGEST_WAIT
            while time.monotonic() < deadline:
                ingested = scrape(stack.metrics_ports["audit-ingest"])
                total = sample_sum(
                    ingested, "arxio_audit_ingest_entries_total"
                )
                if total >= FREE_DAILY_LIMIT + len(statuses):
                    break
                time.sleep(0.5)
            # Envoy health-checks each service every 2 s, so a window of two
            # intervals contains at least one check, however fast the
            # requests are.
            time.sleep(
                max(0.0, started + 2 * HEALTH_CHECK_SECONDS - time.monotonic())
            )
            after = {
                name: scrape(stack.metrics_ports[name]) for name in CHILDREN
            }
            texts = {
                name: metrics_text(stack.metrics_ports[name])
                for name in CHILDREN
            }
            yield {
                "stack": stack,
                "before": before,
                "after": after,
                "texts": texts,
                "statuses": statuses,
                "free_statuses": free_statuses,
                "secrets": [
                    pro.api_key,
                    free.api_key,
                    pro.org_id,
                    free.org_id,
                    "warfarin",
                ],
            }


def moved(exercised, child: str, name: str, **labels: str) -> float:
    """Return how much a series of one child grew during the round."""
    return sample_sum(exercised["after"][child], name, **labels) - sample_sum(
        exercised["before"][child], name, **labels
    )


@pytest.mark.e2e
class TestServiceMetrics:
    def test_requests_succeeded(self, exercised):
        assert [200, 200, 200, 200] == exercised["statuses"]
        assert [200] * FREE_DAILY_LIMIT + [429] == exercised["free_statuses"]

    @pytest.mark.parametrize(
        ("child", "service", "method"),
        [
            ("auth", "envoy.service.auth.v3.Authorization", "Check"),
            (
                "cds",
                "arxio.cds.v1.ClinicalDecisionSupportService",
                "ClinicalReview",
            ),
            ("audit", "arxio.audit.v1.AuditService", "ListAuditEvents"),
            ("billing", "arxio.billing.v1.BillingService", "GetUsage"),
        ],
    )
    def test_rpcs_counted_and_timed(self, exercised, child, service, method):
        labels = {"grpc_service": service, "grpc_method": method}

        handled = moved(
            exercised,
            child,
            "grpc_server_handled_total",
            grpc_code="OK",
            grpc_type="unary",
            **labels,
        )
        timed = moved(
            exercised, child, "grpc_server_handling_seconds_count", **labels
        )

        assert handled >= 1
        assert timed == handled

    def test_health_checks_counted(self, exercised):
        """Envoy's active health checks show up as Health/Check RPCs."""
        assert moved(
            exercised,
            "billing",
            "grpc_server_handled_total",
            grpc_service="grpc.health.v1.Health",
            grpc_method="Check",
        )

    def test_model_calls_by_outcome(self, exercised):
        assert 1 == moved(
            exercised, "cds", "arxio_model_calls_total", outcome="ok"
        )
        assert 1 == moved(
            exercised,
            "cds",
            "arxio_model_call_duration_seconds_count",
            outcome="ok",
        )

    def test_auth_decisions_and_quota_denials(self, exercised):
        assert (
            moved(exercised, "auth", "arxio_auth_decisions_total", code="OK")
            >= FREE_DAILY_LIMIT + 4
        )
        assert 1 == moved(
            exercised,
            "auth",
            "arxio_auth_decisions_total",
            code="RESOURCE_EXHAUSTED",
        )
        assert 1 == moved(exercised, "auth", "arxio_auth_quota_denials_total")


@pytest.mark.e2e
class TestAuditIngestMetrics:
    def test_entries_and_lag(self, exercised):
        entries = moved(
            exercised, "audit-ingest", "arxio_audit_ingest_entries_total"
        )
        lags = moved(
            exercised, "audit-ingest", "arxio_audit_ingest_lag_seconds_count"
        )

        assert entries >= FREE_DAILY_LIMIT + 5
        assert lags == entries

    def test_lag_within_seconds(self, exercised):
        """Most entries are stored within 2.5 s of their request."""
        within = moved(
            exercised,
            "audit-ingest",
            "arxio_audit_ingest_lag_seconds_bucket",
            le="2.5",
        )
        entries = moved(
            exercised, "audit-ingest", "arxio_audit_ingest_lag_seconds_count"
        )

        assert within >= 0.9 * entries

    def test_bytes_behind_reported(self, exercised):
        assert (
            "arxio_audit_ingest_bytes_behind"
            in exercised["texts"]["audit-ingest"]
        )


@pytest.mark.e2e
class TestEnvoyMetrics:
    def test_upstream_requests_counted(self, exercised):
        assert (
            moved(
                exercised,
                "envoy",
                "envoy_cluster_upstream_rq_total",
                envoy_cluster_name="cds",
            )
            >= FREE_DAILY_LIMIT + 2
        )

    def test_stats_path_served(self, exercised):
        port = exercised["stack"].metrics_ports["envoy"]

        text = metrics_text(port, "/stats/prometheus")

        assert "envoy_server_live" in text

    @pytest.mark.parametrize(
        ("method", "path"),
        [("GET", "/config_dump"), ("POST", "/quitquitquit"), ("GET", "/")],
    )
    def test_admin_not_reachable(self, exercised, method, path):
        """Only the stats pass; the admin's other endpoints do not."""
        stack = exercised["stack"]
        port = stack.metrics_ports["envoy"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", method=method
        )

        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=5)

        assert 404 == raised.value.code
        assert stack.child("envoy").running()


@pytest.mark.e2e
class TestNoSensitiveLabels:
    @pytest.mark.parametrize("child", CHILDREN)
    def test_no_key_org_or_content(self, exercised, child):
        text = exercised["texts"][child]

        for secret in exercised["secrets"]:
            assert secret not in text


class TestMetricsServer:
    """The metrics server on its own, without a suite."""

    def test_no_port_no_server(self):
        config = metrics.MetricsConfig.from_env(Environment({}))

        assert config.port is None
        assert metrics.start_metrics_server(config) is None

    def test_host_defaults_to_service_host(self):
        config = metrics.MetricsConfig.from_env(
            Environment({"ARXIO_HOST": "::1", "ARXIO_METRICS_PORT": "9464"})
        )

        assert "::1" == config.host
        assert 9464 == config.port

    def test_bracketed_ipv6_service_host(self):
        """ARXIO_HOST as gRPC writes it, "[::1]", serves metrics on ::1."""
        config = metrics.MetricsConfig.from_env(
            Environment({"ARXIO_HOST": "[::1]", "ARXIO_METRICS_PORT": "0"})
        )
        server = metrics.start_metrics_server(config)
        try:
            port = server.server.server_port
            with urllib.request.urlopen(
                f"http://[::1]:{port}/metrics", timeout=5
            ) as response:
                status = response.status
        finally:
            server.stop()

        assert "::1" == config.host
        assert 200 == status

    def test_serves_rpc_series(self):
        metrics.observe_rpc("/test.v1.Probe/Ping", "unary", "OK", 0.003)
        server = metrics.start_metrics_server(
            metrics.MetricsConfig(host="127.0.0.1", port=0)
        )
        try:
            text = metrics_text(server.server.server_port)
        finally:
            server.stop()

        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Ping",'
            'grpc_service="test.v1.Probe",grpc_type="unary"}'
        ) in text
        assert "grpc_server_handling_seconds_bucket" in text

    def test_port_in_use_is_config_error(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = metrics.MetricsConfig(host="127.0.0.1", port=port)

            with pytest.raises(ConfigError, match="ARXIO_METRICS_PORT"):
                metrics.start_metrics_server(config)
