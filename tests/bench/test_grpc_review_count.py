"""Requests a second of native gRPC through Envoy count OK calls only."""

from bench.measure import CpuSource
from bench.scenarios import (
    CLINICAL_REVIEW,
    Edge,
    Service,
    Setting,
    grpc_review,
)

EDGE_METRICS_PORT = 9901
CDS_METRICS_PORT = 9102


def service(name: str, metrics_port: int) -> Service:
    return Service(name, 50051, metrics_port, f"{name}.arxio.internal")


def setting(certs_dir) -> Setting:
    # The channels are opened lazily and never connect in these tests.
    for name in ("ca.crt", "envoy.key", "envoy.crt"):
        (certs_dir / name).write_text("unused\n")
    edge = Edge("edge-1", 8443, EDGE_METRICS_PORT, 1, 9200)

    return Setting(
        certs_dir=certs_dir,
        api_key="unused",
        org_id="unused",
        concurrency=1,
        postgres=CpuSource("postgres", "tree", 1),
        admin_database_url="",
        audit_database_url="",
        edge_1=edge,
        edge_2=edge,
        echo_edge=edge,
        auth=service("auth", 9101),
        auth_2=service("auth", 9103),
        cds=service("cds", CDS_METRICS_PORT),
        cds_2=service("cds", 9104),
        audit=service("audit", 9105),
        echo=service("echo", 9106),
        empty_check=service("auth", 9107),
    )


def scrapes_with_failed_calls() -> dict[int, dict]:
    """Return scrapes after 100 calls through the edge, 40 of which
    failed with UNAVAILABLE inside HTTP 200 responses."""
    grpc_service, grpc_method = CLINICAL_REVIEW.split("/")

    def handled(code: str) -> tuple[str, frozenset]:
        labels = {
            "grpc_service": grpc_service,
            "grpc_method": grpc_method,
            "grpc_type": "unary",
            "grpc_code": code,
        }

        return ("grpc_server_handled_total", frozenset(labels.items()))

    edge_2xx = (
        "envoy_http_downstream_rq_xx_total",
        frozenset(
            {
                ("envoy_http_conn_manager_prefix", "edge"),
                ("envoy_response_code_class", "2"),
            }
        ),
    )

    return {
        EDGE_METRICS_PORT: {edge_2xx: 100.0},
        CDS_METRICS_PORT: {handled("OK"): 60.0, handled("UNAVAILABLE"): 40.0},
    }


def test_grpc_review_counts_ok_calls(tmp_path):
    comparison = grpc_review(setting(tmp_path))

    count = comparison.measured.count.read(scrapes_with_failed_calls())

    assert count == 60.0


def test_grpc_review_baseline_counts_ok_calls(tmp_path):
    comparison = grpc_review(setting(tmp_path))

    count = comparison.baseline.count.read(scrapes_with_failed_calls())

    assert count == 60.0
