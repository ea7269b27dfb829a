"""The scenarios of `make bench`, each with the baseline it is compared to.

Each function returns a Comparison whose two sides send their requests
with the load of bench/load.py and name the server-side figures that
bench/measure.py reads. bench/suite_setup.py starts the processes they
reach.
"""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import json_format

from bench import audit_ingest
from bench.audit_query import PAGE_SIZE, Query, first_page_sql
from bench.auth import check_request
from bench.common import REPO_ROOT, KeptAliveClient, run_folder
from bench.load import (
    LoadResult,
    Sender,
    SenderFactory,
    closed_loop,
    open_loop,
)
from bench.measure import Comparison, Counter, CpuSource, Histogram, Side
from services.audit.ingest import MAX_BATCH_LINES
from services.audit.store import EventFilter

REVIEW_PATH = "/v1/cds/clinical-review"
# The RPCs that direct calls measure. Envoy's health checks call
# grpc.health.v1.Health/Check, so a method name alone is not enough.
CLINICAL_REVIEW = "arxio.cds.v1.ClinicalDecisionSupportService/ClinicalReview"
AUTH_CHECK = "envoy.service.auth.v3.Authorization/Check"
AUDIT_PAGE_PATH = f"/v1/audit?pageSize={PAGE_SIZE}"
EXAMPLE_REVIEW = REPO_ROOT / "examples" / "review.json"
# Seconds a client waits for one response; a model review on a busy
# machine takes tens of seconds.
REQUEST_TIMEOUT = 30.0
MODEL_REQUEST_TIMEOUT = 300.0
# Enum fields of the example review, which the edge parses whatever their
# case and protobuf's JSON parser only in upper case.
ENUM_FIELDS = ("sex", "severity")
# Lines generated per second of an ingest run: more than the ingester
# stores a second, so that a run ends at its time limit, not at the end of
# the file.
BATCHED_LINES_PER_SECOND = 20_000
ROW_LINES_PER_SECOND = 1_000
MAX_GENERATED_LINES = 300_000


def _upper_enums(value: object) -> object:
    if isinstance(value, dict):
        return {
            key: item.upper()
            if key in ENUM_FIELDS and isinstance(item, str)
            else _upper_enums(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_upper_enums(item) for item in value]

    return value


def example_review(model_review: bool) -> cds_pb2.ClinicalReviewRequest:
    """Return examples/review.json as a request, with or without the model.

    The REST body is this message's JSON form, so REST and native gRPC
    calls send the same review.
    """
    review = _upper_enums(json.loads(EXAMPLE_REVIEW.read_text()))
    request = json_format.ParseDict(review, cds_pb2.ClinicalReviewRequest())
    request.options.model_review = model_review

    return request


def review_body(request: cds_pb2.ClinicalReviewRequest) -> bytes:
    return json_format.MessageToJson(request, indent=None).encode()


@dataclass(frozen=True)
class Edge:
    """One Envoy that the harness started, with its figures' sources."""

    name: str
    port: int
    metrics_port: int
    pid: int
    # Metrics port of the audit ingester that reads this edge's log.
    ingest_metrics_port: int

    def cpu(self) -> list[CpuSource]:
        return [
            CpuSource(f"Envoy {self.name}", "process", self.pid),
            CpuSource(
                f"audit ingester of {self.name}",
                "metrics",
                self.ingest_metrics_port,
            ),
        ]

    def requests(self) -> Counter:
        """Requests that the edge completed with a 2xx status."""
        return Counter(
            self.metrics_port,
            # The Prometheus parser names a counter's samples `_total`.
            "envoy_http_downstream_rq_xx_total",
            (
                ("envoy_http_conn_manager_prefix", "edge"),
                ("envoy_response_code_class", "2"),
            ),
        )

    def latency(self) -> Histogram:
        return Histogram(
            self.metrics_port,
            "envoy_http_downstream_rq_time",
            (("envoy_http_conn_manager_prefix", "edge"),),
            unit_ms=1.0,
            merged_on_read=True,
        )


@dataclass(frozen=True)
class Service:
    """A gRPC server process reachable over mutual TLS."""

    name: str
    port: int
    metrics_port: int
    # The name in its certificate, which the client checks.
    certificate_name: str

    def cpu(self) -> CpuSource:
        return CpuSource(self.name, "metrics", self.metrics_port)

    def handled(self, rpc: str) -> Counter:
        """RPCs of `rpc`, such as "envoy.service.auth.v3.Authorization/
        Check", that ended with OK."""
        grpc_service, grpc_method = rpc.split("/")

        return Counter(
            self.metrics_port,
            "grpc_server_handled_total",
            (
                ("grpc_service", grpc_service),
                ("grpc_method", grpc_method),
                ("grpc_code", "OK"),
            ),
        )

    def latency(self, rpc: str) -> Histogram:
        grpc_service, grpc_method = rpc.split("/")

        return Histogram(
            self.metrics_port,
            "grpc_server_handling_seconds",
            (("grpc_service", grpc_service), ("grpc_method", grpc_method)),
            unit_ms=1000.0,
        )


def _edge_credentials(certs_dir: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs_dir / "ca.crt").read_bytes(),
        private_key=(certs_dir / "envoy.key").read_bytes(),
        certificate_chain=(certs_dir / "envoy.crt").read_bytes(),
    )


def mutual_tls_channel(certs_dir: Path, service: Service) -> grpc.Channel:
    """Open a channel to a service as the edge, with its certificate."""
    return grpc.secure_channel(
        f"127.0.0.1:{service.port}",
        _edge_credentials(certs_dir),
        options=[("grpc.ssl_target_name_override", service.certificate_name)],
    )


def round_robin_channel(
    certs_dir: Path, replicas: list[Service]
) -> grpc.Channel:
    """Open one channel, as the edge, that sends each call to the next of
    the replicas' loopback addresses (gRPC's round_robin policy over a
    static address list). The replicas share one certificate name."""
    addresses = ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)

    return grpc.secure_channel(
        f"ipv4:{addresses}",
        _edge_credentials(certs_dir),
        options=[
            ("grpc.ssl_target_name_override", replicas[0].certificate_name),
            ("grpc.lb_policy_name", "round_robin"),
        ],
    )


@dataclass
class Setting:
    """Credentials and processes that the scenarios send requests to."""

    certs_dir: Path
    api_key: str
    org_id: str
    concurrency: int
    postgres: CpuSource
    admin_database_url: str
    audit_database_url: str
    edge_1: Edge
    edge_2: Edge
    echo_edge: Edge
    auth: Service
    auth_2: Service
    cds: Service
    cds_2: Service
    audit: Service
    echo: Service
    empty_check: Service

    def mutual_tls_channel(self, service: Service) -> grpc.Channel:
        return mutual_tls_channel(self.certs_dir, service)

    def edge_channel(self, edge: Edge) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            (self.certs_dir / "ca.crt").read_bytes()
        )

        return grpc.secure_channel(f"localhost:{edge.port}", credentials)


def rest_sender(
    setting: Setting,
    edge: Edge,
    method: str,
    path: str,
    body: bytes | None,
    check: Callable[[dict], None],
    timeout: float = REQUEST_TIMEOUT,
) -> SenderFactory:
    """Return a factory of senders of one REST request, each on a
    kept-alive connection of its own."""
    headers = {"x-api-key": setting.api_key}
    if body is not None:
        headers["content-type"] = "application/json"

    def factory() -> Sender:
        client = KeptAliveClient(
            edge.port, setting.certs_dir / "ca.crt", timeout
        )

        def send() -> None:
            status, payload = client.request(method, path, body, headers)
            if status != 200:
                raise RuntimeError(
                    f"{method} {path} returned HTTP {status}, expected 200: "
                    f"{payload[:300]!r}"
                )
            check(json.loads(payload))

        return send

    return factory


def check_rules_only(review: dict) -> None:
    if not review.get("findings"):
        raise RuntimeError("the review has no findings")
    status = review["modelReview"]["status"]
    if status != "SKIPPED":
        raise RuntimeError(f"modelReview.status is {status}, not SKIPPED")


def check_model_review(review: dict) -> None:
    if not review.get("findings"):
        raise RuntimeError("the review has no findings")
    model_review = review["modelReview"]
    if model_review["status"] != "OK":
        raise RuntimeError(
            f"modelReview.status is {model_review['status']}, not OK: "
            f"{model_review.get('reason', '')}"
        )


def check_audit_page(page: dict) -> None:
    if not page.get("auditEvents"):
        raise RuntimeError("the audit page has no events")


def _closed(factory: SenderFactory, concurrency: int):
    return lambda seconds: closed_loop(factory, concurrency, seconds)


def edge_review_cpu(setting: Setting, edge: Edge) -> list[CpuSource]:
    """CPU of a rules-only review through one of the 1-replica edges."""
    return [
        *edge.cpu(),
        setting.auth.cpu(),
        setting.cds.cpu(),
        setting.postgres,
    ]


def rest_review_side(setting: Setting, edge: Edge, title: str) -> Side:
    body = review_body(example_review(model_review=False))
    factory = rest_sender(
        setting, edge, "POST", REVIEW_PATH, body, check_rules_only
    )

    return Side(
        title,
        _closed(factory, setting.concurrency),
        cpu=[],
        count=edge.requests(),
        latency=edge.latency(),
    )


def rest_review(setting: Setting) -> Comparison:
    """REST clinical review, rules only, through the full edge, against
    the same edge and filters in front of the echo service."""
    measured = rest_review_side(
        setting, setting.edge_1, "REST clinical review, rules only, full edge"
    )
    measured.cpu = edge_review_cpu(setting, setting.edge_1)
    baseline = rest_review_side(
        setting,
        setting.echo_edge,
        "baseline: same edge and filters, echo service behind it",
    )
    baseline.cpu = [
        *setting.echo_edge.cpu(),
        setting.auth.cpu(),
        setting.echo.cpu(),
        setting.postgres,
    ]

    return Comparison("rest_review", measured, baseline)


def grpc_review_sender(
    channel: grpc.Channel, metadata: list[tuple[str, str]]
) -> SenderFactory:
    stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
    request = example_review(model_review=False)

    def factory() -> Sender:
        def send() -> None:
            reply = stub.ClinicalReview(
                request, metadata=metadata, timeout=REQUEST_TIMEOUT
            )
            if not reply.findings:
                raise RuntimeError("the review has no findings")

        return send

    return factory


def grpc_review(setting: Setting) -> Comparison:
    """Native gRPC clinical review through Envoy, against the same CDS
    service called directly."""
    edge = setting.edge_1
    through_edge = grpc_review_sender(
        setting.edge_channel(edge), [("x-api-key", setting.api_key)]
    )
    direct = grpc_review_sender(setting.mutual_tls_channel(setting.cds), [])
    measured = Side(
        "native gRPC clinical review through Envoy",
        _closed(through_edge, setting.concurrency),
        cpu=edge_review_cpu(setting, edge),
        # Envoy returns a failed gRPC call as HTTP 200 with the error in
        # grpc-status, so its 2xx count would include failed calls. The
        # CDS replica behind this edge counts the calls that ended OK.
        count=setting.cds.handled(CLINICAL_REVIEW),
        latency=edge.latency(),
    )
    baseline = Side(
        "baseline: the same CDS service called directly",
        _closed(direct, setting.concurrency),
        cpu=[setting.cds.cpu()],
        count=setting.cds.handled(CLINICAL_REVIEW),
        latency=setting.cds.latency(CLINICAL_REVIEW),
    )

    return Comparison("grpc_review", measured, baseline)


def sql_page_sender(setting: Setting) -> SenderFactory:
    """Return senders of the audit page's query, straight to PostgreSQL as
    the audit service's role, scoped to the organization as the service
    scopes it."""
    sql, parameters = first_page_sql(
        setting.org_id, Query("newest page", {}, EventFilter())
    )

    def factory() -> Sender:
        connection = psycopg.connect(setting.audit_database_url)

        def send() -> None:
            with connection.transaction():
                connection.execute(
                    "SELECT set_config('arxio.org_id', %s, true)",
                    (setting.org_id,),
                )
                rows = connection.execute(sql, parameters).fetchall()
            if not rows:
                raise RuntimeError("the audit query returned no rows")

        return send

    return factory


def audit_page(setting: Setting) -> Comparison:
    """`GET /v1/audit` page through the edge, against the same query run
    directly in PostgreSQL."""
    edge = setting.edge_1
    factory = rest_sender(
        setting, edge, "GET", AUDIT_PAGE_PATH, None, check_audit_page
    )
    measured = Side(
        f"`GET /v1/audit?pageSize={PAGE_SIZE}` page through the edge",
        _closed(factory, setting.concurrency),
        cpu=[
            *edge.cpu(),
            setting.auth.cpu(),
            setting.audit.cpu(),
            setting.postgres,
        ],
        count=edge.requests(),
        latency=edge.latency(),
    )
    baseline = Side(
        "baseline: the same query run directly in PostgreSQL",
        _closed(sql_page_sender(setting), setting.concurrency),
        cpu=[setting.postgres],
    )

    return Comparison("audit_page", measured, baseline)


def check_sender(channel: grpc.Channel, api_key: str) -> SenderFactory:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    request = check_request(api_key)

    def factory() -> Sender:
        def send() -> None:
            reply = stub.Check(request, timeout=REQUEST_TIMEOUT)
            if reply.status.code != 0:
                raise RuntimeError(
                    f"Check denied the request with code {reply.status.code}"
                )

        return send

    return factory


def auth_check(setting: Setting) -> Comparison:
    """Auth `Check` for a known key, against an empty Check handler on the
    same server setup."""
    real = check_sender(
        setting.mutual_tls_channel(setting.auth), setting.api_key
    )
    empty = check_sender(
        setting.mutual_tls_channel(setting.empty_check), setting.api_key
    )
    measured = Side(
        "auth `Check`, called directly over mutual TLS",
        _closed(real, setting.concurrency),
        cpu=[setting.auth.cpu(), setting.postgres],
        count=setting.auth.handled(AUTH_CHECK),
        latency=setting.auth.latency(AUTH_CHECK),
    )
    baseline = Side(
        "baseline: an empty `Check` handler on the same server setup",
        _closed(empty, setting.concurrency),
        cpu=[setting.empty_check.cpu()],
        count=setting.empty_check.handled(AUTH_CHECK),
        latency=setting.empty_check.latency(AUTH_CHECK),
    )

    return Comparison("auth_check", measured, baseline)


class IngestRuns:
    """Runs of the audit ingester's own `store` on generated log lines.

    Each run reads a new file, and stores it under a source name of its
    own, so that runs never share a committed offset. `prepare` writes the
    file before the measured window opens, so that the harness's CPU time
    includes the ingest but not the generating and writing of the lines.
    """

    def __init__(
        self, admin_database_url: str, batch_lines: int, per_second: int
    ) -> None:
        self._url = admin_database_url
        self._batch_lines = batch_lines
        self._per_second = per_second
        self._lines: list[str] = []
        self._runs = 0
        self._prepared: Path | None = None

    def prepare(self, seconds: float) -> None:
        """Write the access-log file of the next run."""
        count = min(
            MAX_GENERATED_LINES, max(100, round(seconds * self._per_second))
        )
        if len(self._lines) < count:
            self._lines = audit_ingest.access_log_lines(count, orgs=20)
        path = run_folder("bench-ingest-") / "access.log"
        path.write_text("\n".join(self._lines[:count]) + "\n")
        self._prepared = path

    def __call__(self, seconds: float) -> LoadResult:
        # A warm-up run is not prepared: it writes its file itself.
        if self._prepared is None:
            self.prepare(seconds)
        path = self._prepared
        self._prepared = None
        folder = path.parent
        self._runs += 1
        try:
            run = asyncio.run(
                audit_ingest.ingest_file(
                    self._url,
                    path,
                    self._batch_lines,
                    f"bench-{self._batch_lines}-{self._runs}",
                    max_seconds=seconds,
                )
            )
        finally:
            path.unlink(missing_ok=True)
            folder.rmdir()

        return LoadResult(
            requests=run.entries,
            latencies_ms=run.transaction_ms,
            seconds=run.seconds,
        )


def audit_ingest_comparison(setting: Setting) -> Comparison:
    """Batched audit ingest, against the same ingester storing row by
    row."""
    cpu = [CpuSource("harness (the ingester)", "self"), setting.postgres]
    batched = IngestRuns(
        setting.admin_database_url, MAX_BATCH_LINES, BATCHED_LINES_PER_SECOND
    )
    row_by_row = IngestRuns(
        setting.admin_database_url, 1, ROW_LINES_PER_SECOND
    )
    measured = Side(
        f"audit ingest, batches of up to {MAX_BATCH_LINES:,} lines",
        batched,
        cpu=cpu,
        prepare=batched.prepare,
    )
    baseline = Side(
        "baseline: row-by-row inserts, one transaction each",
        row_by_row,
        cpu=cpu,
        prepare=row_by_row.prepare,
    )

    comparison = Comparison("audit_ingest", measured, baseline)
    comparison.notes.append(
        "Audit ingest: requests are entries stored, and p50 and p99 are "
        "those of one transaction (reading a batch, chaining it, the "
        "INSERT and the commit), of up to "
        f"{MAX_BATCH_LINES:,} entries or of one."
    )

    return comparison


def scaling(setting: Setting) -> Comparison:
    """Compare the rules-only REST review with cds and auth at 2 replicas
    against the same at 1 replica each."""
    measured = rest_review_side(
        setting,
        setting.edge_2,
        "REST clinical review, rules only, cds and auth at 2 replicas each",
    )
    measured.cpu = [
        *setting.edge_2.cpu(),
        setting.auth.cpu(),
        setting.auth_2.cpu(),
        setting.cds.cpu(),
        setting.cds_2.cpu(),
        setting.postgres,
    ]
    baseline = rest_review_side(
        setting, setting.edge_1, "baseline: cds and auth at 1 replica each"
    )
    baseline.cpu = edge_review_cpu(setting, setting.edge_1)

    return Comparison("scaling", measured, baseline)


def cds_scaling(setting: Setting) -> Comparison:
    """Compare native gRPC reviews sent straight to both CDS replicas,
    spread round-robin by the client, against the same calls to one.

    Without Envoy, auth and PostgreSQL on the path, only the CDS
    replicas and the client use CPU, so the pair shows whether a second
    replica adds throughput on this machine. The client counts the calls
    that returned a review, because each replica counts only its own.

    NOTE: the Python client shares the cores. In a 1-second trial on 2
    cores, 1 replica used about half a core, so the client may limit the
    2-replica side before the service does.
    """
    replicas = [setting.cds, setting.cds_2]
    two_replicas = grpc_review_sender(
        round_robin_channel(setting.certs_dir, replicas), []
    )
    one_replica = grpc_review_sender(
        setting.mutual_tls_channel(setting.cds), []
    )
    measured = Side(
        "native gRPC clinical review, CDS called directly at 2 replicas, "
        "calls spread round-robin",
        _closed(two_replicas, setting.concurrency),
        cpu=[replica.cpu() for replica in replicas],
    )
    baseline = Side(
        "baseline: the same calls to 1 CDS replica",
        _closed(one_replica, setting.concurrency),
        cpu=[setting.cds.cpu()],
    )

    return Comparison("cds_scaling", measured, baseline)


def open_loop_review(setting: Setting, rate: float, threads: int) -> Side:
    """Send the rules-only REST review through the full edge at a fixed
    rate."""
    body = review_body(example_review(model_review=False))
    factory = rest_sender(
        setting, setting.edge_1, "POST", REVIEW_PATH, body, check_rules_only
    )

    return Side(
        f"REST clinical review, rules only, full edge, {rate:g} requests "
        "a second (open loop)",
        lambda seconds: open_loop(factory, rate, seconds, threads),
        cpu=edge_review_cpu(setting, setting.edge_1),
        count=setting.edge_1.requests(),
        latency=setting.edge_1.latency(),
    )
