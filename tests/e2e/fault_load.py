"""Load, probes and figures shared by the fault tests.

Every fault test starts its own suite on loopback ports and sends requests
from client threads while it breaks one part. It writes its figures
(requests sent, failed, recovery time, audit entries lost) to
.run/faults/NAME.json, and `bench/faults_report.py` turns those files
into the "Faults" section of docs/benchmarks.md.
"""

import datetime
import http.server
import json
import os
import socketserver
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.common import percentile as nearest_rank
from services.launcher.stack import REPO_ROOT, Stack, health_status
from tests.edge import EdgeClient

RUN_ROOT = REPO_ROOT / ".run"
FIGURES_DIR = RUN_ROOT / "faults"
# Figures files that the running test wrote, whose result is not known yet.
_figures_without_result: list[Path] = []
REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "warfarin"}, {"name": "ibuprofen"}],
    "options": {"modelReview": False},
}
WITH_MODEL = {"medications": [{"name": "warfarin"}, {"name": "ibuprofen"}]}
AUDIT_PAGE_PATH = "/v1/audit?pageSize=5"
# Seconds between two requests of one client thread.
REQUEST_GAP = 0.02
# Seconds the ingester gets to store every entry after the load stops.
AUDIT_WAIT = 90.0


@dataclass(frozen=True)
class Outcome:
    """One request a client thread sent, and what came back."""

    kind: str
    # time.monotonic() when the request was sent and when it returned.
    started: float
    finished: float
    # "200", "503", "grpc OK", "grpc UNAVAILABLE", or "no response".
    status: str
    request_id: str | None
    # False when the response broke the kind's own check.
    ok: bool
    # The check's problem, else a review's model status (OK, SKIPPED,
    # UNAVAILABLE), or the transport error of a request with no response.
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass
class Recorder:
    """Outcomes of every client thread, in order of return."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def started_between(
        self, start: float, end: float, kind: str | None = None
    ) -> list[Outcome]:
        return [
            outcome
            for outcome in self.snapshot()
            if start <= outcome.started < end
            and (kind is None or outcome.kind == kind)
        ]

    def request_ids(self) -> list[str]:
        return [o.request_id for o in self.snapshot() if o.request_id]


Send = Callable[[], Outcome]


def guarded(send: Send, kind: str) -> Send:
    """Return `send` with any exception it raises turned into a failed
    outcome, so that a client thread never dies without a record."""

    def send_guarded() -> Outcome:
        started = time.monotonic()
        try:
            return send()
        except Exception as error:
            return Outcome(
                kind,
                started,
                time.monotonic(),
                "client error",
                None,
                False,
                repr(error),
            )

    return send_guarded


class LoadClients:
    """Client threads that each repeat one request until stopped."""

    def __init__(self, recorder: Recorder, senders: list[Send]) -> None:
        self.recorder = recorder
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(guarded(send, "sender"),),
                daemon=True,
            )
            for send in senders
        ]

    def _run(self, send: Send) -> None:
        while not self._stop.is_set():
            self.recorder.add(send())
            time.sleep(REQUEST_GAP)

    def __enter__(self) -> "LoadClients":
        for thread in self._threads:
            thread.start()

        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


def rest_sender(
    edge: EdgeClient,
    kind: str,
    method: str,
    path: str,
    body: object,
    headers: dict[str, str],
    check: Callable[[dict], str | None] | None = None,
    expected: int = 200,
) -> Send:
    """Return a sender of one REST request.

    A response is ok when its status is `expected` and, for a 200, when
    `check` returns no problem with its JSON.
    """

    def send() -> Outcome:
        started = time.monotonic()
        try:
            response = edge.request(method, path, body, headers)
        except OSError as error:
            return Outcome(
                kind,
                started,
                time.monotonic(),
                "no response",
                None,
                False,
                repr(error),
            )
        finished = time.monotonic()
        detail = ""
        ok = response.status == expected
        if response.status == 200 and path == REVIEW_PATH:
            detail = response.json()["modelReview"]["status"]
        if response.status == 200 and check is not None:
            problem = check(response.json())
            detail = problem or detail
            ok = ok and problem is None

        return Outcome(
            kind,
            started,
            finished,
            str(response.status),
            response.headers.get("x-request-id"),
            ok,
            detail,
        )

    return send


def review_sender(edge: EdgeClient, headers: dict[str, str]) -> Send:
    """Return a sender of the rules-only review over REST, which passes
    only when its findings include the interaction."""
    return rest_sender(
        edge,
        "review",
        "POST",
        REVIEW_PATH,
        RULES_ONLY,
        headers,
        has_interaction,
    )


def grpc_review_request(model_review: bool) -> cds_pb2.ClinicalReviewRequest:
    """Return the gRPC review of warfarin with ibuprofen, an interaction."""
    return cds_pb2.ClinicalReviewRequest(
        medications=[
            cds_pb2.Medication(name="warfarin"),
            cds_pb2.Medication(name="ibuprofen"),
        ],
        options=cds_pb2.ReviewOptions(model_review=model_review),
    )


def grpc_review_sender(
    edge: EdgeClient, api_key: str, timeout: float = 30.0
) -> Send:
    """Return a sender of rules-only reviews over native gRPC."""
    channel = edge.channel()
    stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
    request = grpc_review_request(model_review=False)

    def send() -> Outcome:
        started = time.monotonic()
        try:
            reply, call = stub.ClinicalReview.with_call(
                request, metadata=[("x-api-key", api_key)], timeout=timeout
            )
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            reply, call, code = None, error, error.code()
        finished = time.monotonic()
        metadata = dict(call.initial_metadata() or ())
        metadata |= dict(call.trailing_metadata() or ())
        ok = code == grpc.StatusCode.OK and len(reply.findings) > 0

        return Outcome(
            "grpc review",
            started,
            finished,
            f"grpc {code.name}",
            metadata.get("x-request-id"),
            ok,
        )

    return send


def has_interaction(review: dict) -> str | None:
    """Return a problem unless the review contains the interaction."""
    categories = {finding["category"] for finding in review["findings"]}
    if "DRUG_INTERACTION" not in categories:
        return f"no DRUG_INTERACTION finding, only {sorted(categories)}"

    return None


class HealthProbe:
    """Poll one service's health in a thread and record every change.

    `changes` contains (time.monotonic(), status) pairs, where the status
    is a HealthCheckResponse value, or None when the service did not
    respond.
    """

    def __init__(
        self, address: str, certs: Path, service: str = "", every=0.1
    ) -> None:
        self._address = address
        self._certs = certs
        self._service = service
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.changes: list[tuple[float, int | None]] = []

    def _run(self) -> None:
        last = object()
        while not self._stop.is_set():
            try:
                status = health_status(
                    self._address, self._certs, self._service
                )
            except grpc.RpcError:
                status = None
            if status != last:
                self.changes.append((time.monotonic(), status))
                last = status
            time.sleep(self._every)

    def first(self, status: int | None, after: float = 0.0) -> float | None:
        """Return when `status` was first seen at or after `after`."""
        for when, seen in self.changes:
            if seen == status and when >= after:
                return when

        return None

    def __enter__(self) -> "HealthProbe":
        self._thread.start()

        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


def metrics_text(port: int, path: str = "/metrics") -> str:
    """Return the Prometheus text that 127.0.0.1:`port` serves."""
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Read a Prometheus text endpoint on 127.0.0.1 into sample values."""
    samples = {}
    for family in text_string_to_metric_families(metrics_text(port)):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = sample.value

    return samples


def scrape_when_up(port: int, timeout: float = 30.0) -> dict:
    """Scrape once the endpoint responds, because the suite does not wait
    for the audit ingester to start."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def sample_sum(
    samples: dict[tuple[str, frozenset], float], name: str, **labels: str
) -> float:
    """Add up the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())

    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and wanted <= sample_labels
    )


def service_rpcs(stack: Stack, child: str) -> float:
    """Count the RPCs one child served, health and reflection left out."""
    samples = scrape(stack.metrics_ports[child])

    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "grpc_server_handled_total"
        and not dict(labels)["grpc_service"].startswith("grpc.")
    )


def missing_entries(stack: Stack, request_ids: list[str]) -> set[str]:
    """Wait for an audit entry of every request id; return those missing."""
    wanted = set(request_ids)
    deadline = time.monotonic() + AUDIT_WAIT
    while True:
        with psycopg.connect(stack.admin_database_url) as connection:
            rows = connection.execute(
                "SELECT DISTINCT request_id FROM audit.events"
                " WHERE request_id = ANY(%s)",
                (list(wanted),),
            ).fetchall()
        missing = wanted - {row[0] for row in rows}
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0

    return nearest_rank(sorted(values), fraction)


def latency_ms(outcomes: list[Outcome]) -> dict[str, float]:
    seconds = [outcome.seconds for outcome in outcomes]

    return {
        "count": len(seconds),
        "p50_ms": round(percentile(seconds, 0.5) * 1000, 1),
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 1),
        "max_ms": round(max(seconds, default=0.0) * 1000, 1),
    }


def write_figures(name: str, figures: dict) -> Path:
    """Write one fault test's figures to .run/faults/NAME.json.

    Unless `figures` has its own "passed", the record stores "passed":
    false until record_test_result() stores the test's result. The hook in
    tests/e2e/conftest.py calls it once the test ends, so a failed or
    interrupted test never leaves figures that read as passed.
    """
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    path = FIGURES_DIR / f"{name}.json"
    record = {
        "fault": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "passed": False,
        # The test that wrote the figures: "tests/e2e/x.py::test_y (call)".
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
    } | figures
    path.write_text(json.dumps(record, indent=2) + "\n")
    if "passed" not in figures:
        _figures_without_result.append(path)

    return path


def mark_figures_stale(test_id: str) -> None:
    """Store "passed": false in the figures that the test `test_id` wrote
    in an earlier run, before it runs again.

    A test that fails before it writes its figures would otherwise leave
    the last run's result standing.
    """
    if not FIGURES_DIR.is_dir():
        return
    for path in FIGURES_DIR.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("test") == test_id and record.get("passed"):
            record["passed"] = False
            path.write_text(json.dumps(record, indent=2) + "\n")


def record_test_result(passed: bool) -> None:
    """Store the result of the test that just ended in the figures it wrote."""
    while _figures_without_result:
        path = _figures_without_result.pop()
        record = json.loads(path.read_text())
        record["passed"] = passed
        path.write_text(json.dumps(record, indent=2) + "\n")


class _ChatHandler(http.server.BaseHTTPRequestHandler):
    """The part of Ollama's API that the CDS service calls."""

    server: "SlowModelServer"

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/api/chat":
            time.sleep(self.server.delay)
            content = json.dumps(
                {"summary": "Review the bleeding risk.", "recommendations": []}
            )
            reply = {
                "model": request.get("model", ""),
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": content},
                "done": True,
                "done_reason": "stop",
            }
        elif self.path == "/api/show":
            reply = {"modelfile": "", "parameters": "", "template": ""}
        else:
            self.send_error(404)
            return
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class SlowModelServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """An Ollama-compatible stand-in on 127.0.0.1 that replies to every
    chat with the same valid review after `delay` seconds.

    The SIGTERM test uses it to keep model reviews in flight while a
    replica stops. Tests of the model itself use the real runtime.
    """

    daemon_threads = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.delay = delay
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "SlowModelServer":
        self._thread.start()

        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()
