"""Prometheus metrics of every service, and the HTTP server that serves them.

Each process serves its metrics at `/metrics` on ARXIO_METRICS_PORT (no
port set: no metrics server) and ARXIO_METRICS_HOST, which defaults to
ARXIO_HOST and then to 127.0.0.1. The gRPC series follow the names of
go-grpc-prometheus, which Grafana's gRPC dashboards expect. Labels carry
method names, status codes and fixed outcome names only: never PHI, a key
or an organization.
"""

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.config import ConfigError, Environment

log = structlog.get_logger()

# Upper bounds in seconds of the latency buckets: from a cached auth
# decision (about a millisecond) to a model review at its longest deadline.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Seconds from the start of an RPC to its status, by method.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)

MODEL_CALLS = Counter(
    "arxio_model_calls_total",
    "Calls to the model server, by outcome: ok, invalid (a reply outside "
    "the schema), timeout, unreachable or error.",
    ["outcome"],
)
MODEL_CALL_SECONDS = Histogram(
    "arxio_model_call_duration_seconds",
    "Seconds of one call to the model server, by outcome.",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
MODEL_REVIEWS_SKIPPED = Counter(
    "arxio_model_reviews_skipped_total",
    "Model reviews answered without calling the model, by cause: "
    "deadline (no time left), breaker_open or no_slot (the concurrency "
    "limit was reached until the deadline).",
    ["cause"],
)

QUOTA_DENIALS = Counter(
    "arxio_auth_quota_denials_total",
    "Requests denied because their organization used its daily quota.",
)
AUTH_DECISIONS = Counter(
    "arxio_auth_decisions_total",
    "Auth decisions for the edge, by the gRPC code of the decision (OK "
    "allows the request).",
    ["code"],
)

AUDIT_INGEST_LAG_SECONDS = Histogram(
    "arxio_audit_ingest_lag_seconds",
    "Seconds from an audit entry's request time to the commit that stored it.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
AUDIT_INGEST_BYTES_BEHIND = Gauge(
    "arxio_audit_ingest_bytes_behind",
    "Bytes of the access-log file after the last committed offset.",
)
AUDIT_INGEST_ENTRIES = Counter(
    "arxio_audit_ingest_entries_total",
    "Audit entries committed by the ingester.",
)
AUDIT_INGEST_SKIPPED_LINES = Counter(
    "arxio_audit_ingest_skipped_lines_total",
    "Access-log lines of normal length skipped as invalid.",
)
AUDIT_INGEST_LONG_LINES = Counter(
    "arxio_audit_ingest_long_lines_total",
    "Access-log lines longer than the edge's format allows, each stored"
    " as an entry all the same.",
)
AUDIT_INGEST_REPLACED_REQUEST_IDS = Counter(
    "arxio_audit_ingest_replaced_request_ids_total",
    "Audit entries stored with a fresh request id in place of the logged"
    " one, by reason: not_edge_form (not an id the edge generates) or"
    " repeated (an entry has it already).",
    ["reason"],
)
AUDIT_INGEST_REPLAYED_LINES = Counter(
    "arxio_audit_ingest_replayed_lines_total",
    "Access-log lines skipped because an entry of the same request, with"
    " the same request id, time and fields, is stored already.",
)
AUDIT_INGEST_FAILURES = Counter(
    "arxio_audit_ingest_failures_total",
    "Batches that failed to commit and wait for a retry.",
)

AUDIT_CHECKPOINT_REJECTIONS = Counter(
    "arxio_audit_checkpoint_rejections_total",
    "Checkpoint runs that rejected a chain, and signed nothing, because"
    " the database no longer matches the chain's newest checkpoint in the"
    " anchor file, by reason: checkpoint_missing, checkpoint_changed or"
    " checkpoint_invalid. Reason anchor_file_empty counts runs that signed"
    " no chain because the anchor file was empty but the database held"
    " checkpoints.",
    ["reason"],
)


def split_method(method: str) -> tuple[str, str]:
    """Split a gRPC path such as `/pkg.Service/Method` into its two names."""
    service, _, name = method.lstrip("/").rpartition("/")

    return service, name


# The labelled series of each (method, type, code), looked up once: the
# client library's own lookup takes a lock on every call.
_RPC_SERIES: dict[tuple[str, str, str], tuple] = {}


def observe_rpc(method: str, rpc_type: str, code: str, seconds: float) -> None:
    """Count one finished RPC and record its latency.

    `rpc_type` is go-grpc-prometheus's name of the RPC's shape: unary,
    client_stream, server_stream or bidi_stream.
    """
    series = _RPC_SERIES.get((method, rpc_type, code))
    if series is None:
        service, name = split_method(method)
        series = (
            GRPC_HANDLED.labels(service, name, rpc_type, code),
            GRPC_HANDLING_SECONDS.labels(service, name, rpc_type),
        )
        _RPC_SERIES[(method, rpc_type, code)] = series
    handled, handling_seconds = series
    handled.inc()
    handling_seconds.observe(seconds)


def observe_model_call(outcome: str, seconds: float) -> None:
    MODEL_CALLS.labels(outcome).inc()
    MODEL_CALL_SECONDS.labels(outcome).observe(seconds)


@dataclass(frozen=True)
class MetricsConfig:
    """Address of the metrics server, or no server when `port` is None."""

    host: str
    port: int | None

    @classmethod
    def from_env(cls, env: Environment) -> "MetricsConfig":
        port = None
        if env.optional("ARXIO_METRICS_PORT") is not None:
            port = env.port("ARXIO_METRICS_PORT")
        host = env.text(
            "ARXIO_METRICS_HOST", env.text("ARXIO_HOST", "127.0.0.1")
        )
        # gRPC takes an IPv6 host in brackets ("[::]"); the HTTP server
        # takes it bare.
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]

        return cls(host=host, port=port)


@dataclass
class MetricsServer:
    """A running metrics server; `stop()` closes its port."""

    server: WSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(config: MetricsConfig) -> MetricsServer | None:
    """Serve the default registry on the configured port, in a thread.

    Returns None when no port is configured. Raises ConfigError when the
    port cannot be bound, so the process exits with a clear message.
    """
    if config.port is None:
        return None
    try:
        server, thread = start_http_server(config.port, addr=config.host)
    except OSError as error:
        raise ConfigError(
            f"failed to bind the metrics port {config.host}:{config.port} "
            f"({error.strerror}): set ARXIO_METRICS_PORT to a free port"
        ) from None
    log.info(
        "metrics.started",
        address=f"{config.host}:{server.server_port}",
        path="/metrics",
    )

    return MetricsServer(server, thread)
