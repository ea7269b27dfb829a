"""The audit trail loses nothing: under steady load over REST and native
gRPC, PostgreSQL restarts, the ingester is killed and the audit service
restarts, and afterwards every response's request id has exactly one
entry."""

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import psycopg
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from tests.edge import EdgeClient
from tests.suite import Organization, cli_process, own_stack

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
# Seconds of load before, between and after the disruptions.
STEADY = 3.0
# Seconds each disrupted part stays down.
DOWN = 3.0
# Seconds between two requests of one client thread.
REQUEST_GAP = 0.02
STORE_WAIT = 90.0


@pytest.fixture
def outage_stack():
    """A suite of its own, since this test stops its database."""
    with own_stack(checkpoint_seconds=1.0) as running:
        yield running


@dataclass
class Outcomes:
    """Request ids and outcomes that the client threads received."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    request_ids: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    # gRPC responses whose request id came in the trailing metadata only.
    grpc_ids_in_trailers: Counter = field(default_factory=Counter)
    # Responses that came back without a request id.
    missing_ids: list[str] = field(default_factory=list)
    # Requests that got no response at all, with the error.
    transport_errors: list[str] = field(default_factory=list)

    def record(self, request_id: str | None, outcome: str) -> None:
        with self.lock:
            self.statuses[outcome] += 1
            if request_id:
                self.request_ids.append(request_id)
            else:
                self.missing_ids.append(outcome)


def rest_client(
    edge: EdgeClient,
    api_key: str,
    free_api_key: str,
    stop,
    outcomes: Outcomes,
):
    """Send reviews, rejected requests and audit reads over REST.

    `free_api_key` belongs to a Free organization whose daily quota is
    used up before the clients start, so its requests get 429.
    """
    key = {"x-api-key": api_key}
    kinds = [
        ("POST", REVIEW_PATH, RULES_ONLY, key),
        ("POST", REVIEW_PATH, RULES_ONLY, {}),
        ("POST", REVIEW_PATH, {"question": "x" * 2001}, key),
        ("POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": "arx_not-a-key"}),
        ("GET", "/v1/audit?pageSize=5", None, key),
        ("POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": free_api_key}),
    ]
    count = 0
    while not stop.is_set():
        method, path, body, headers = kinds[count % len(kinds)]
        count += 1
        try:
            response = edge.request(method, path, body, headers)
        except OSError as error:
            with outcomes.lock:
                outcomes.transport_errors.append(repr(error))
            continue
        outcomes.record(
            response.headers.get("x-request-id"), f"http {response.status}"
        )
        time.sleep(REQUEST_GAP)


def grpc_client(edge: EdgeClient, api_key: str, stop, outcomes: Outcomes):
    """Send reviews over native gRPC: valid, without a key, and invalid.

    A response with a message carries the request id in its initial
    metadata. An error without one is a trailers-only response, so gRPC
    clients get the id in the trailing metadata instead.
    """
    review = cds_pb2.ClinicalReviewRequest(
        medications=[cds_pb2.Medication(name="metformin")],
        options=cds_pb2.ReviewOptions(model_review=False),
    )
    invalid = cds_pb2.ClinicalReviewRequest(
        medications=[cds_pb2.Medication(name="metformin")],
        question="x" * 2001,
        options=cds_pb2.ReviewOptions(model_review=False),
    )
    key = [("x-api-key", api_key)]
    kinds = [(review, key), (review, []), (review, key), (invalid, key)]
    with edge.channel() as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        count = 0
        while not stop.is_set():
            request, metadata = kinds[count % len(kinds)]
            count += 1
            try:
                _, call = stub.ClinicalReview.with_call(
                    request, metadata=metadata, timeout=30
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                call = error
                code = error.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                with outcomes.lock:
                    outcomes.transport_errors.append(f"grpc {code.name}")
                continue
            initial = dict(call.initial_metadata() or ())
            trailing = dict(call.trailing_metadata() or ())
            request_id = initial.get("x-request-id")
            if request_id is None and "x-request-id" in trailing:
                request_id = trailing["x-request-id"]
                with outcomes.lock:
                    outcomes.grpc_ids_in_trailers[code.name] += 1
            outcomes.record(request_id, f"grpc {code.name}")
            time.sleep(REQUEST_GAP)


def entry_counts(stack, request_ids: list[str]) -> Counter:
    with psycopg.connect(stack.admin_database_url) as connection:
        rows = connection.execute(
            "SELECT request_id, count(*) FROM audit.events"
            " WHERE request_id = ANY(%s) GROUP BY request_id",
            (request_ids,),
        ).fetchall()

    return Counter(dict(rows))


def wait_for_entries(stack, request_ids: list[str]) -> Counter:
    """Wait until every request id has an entry; return the counts."""
    deadline = time.monotonic() + STORE_WAIT
    while True:
        counts = entry_counts(stack, request_ids)
        if len(counts) == len(set(request_ids)):
            return counts
        if time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def use_up_daily_quota(stack, org_id: str, limit: int) -> None:
    """Record `limit` requests of today for an organization."""
    with psycopg.connect(stack.admin_database_url) as connection:
        connection.execute(
            "INSERT INTO auth.daily_usage (org_id, day, request_count)"
            " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, %s)"
            " ON CONFLICT (org_id, day) DO UPDATE"
            " SET request_count = excluded.request_count",
            (org_id, limit),
        )


def test_every_request_has_one_entry(outage_stack):
    stack = outage_stack
    edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
    org = Organization(stack, plan="pro")
    free_org = Organization(stack, plan="free")
    use_up_daily_quota(stack, free_org.org_id, 100)
    outcomes = Outcomes()
    stop = threading.Event()
    rest_arguments = (edge, org.api_key, free_org.api_key, stop, outcomes)
    clients = [
        threading.Thread(target=rest_client, args=rest_arguments),
        threading.Thread(target=rest_client, args=rest_arguments),
        threading.Thread(
            target=grpc_client, args=(edge, org.api_key, stop, outcomes)
        ),
    ]
    for client in clients:
        client.start()
    ingest_pid = stack.child("audit-ingest").process.pid
    audit_pid = stack.child("audit").process.pid
    try:
        time.sleep(STEADY)
        stack.stop_database()
        time.sleep(DOWN)
        stack.start_database()
        time.sleep(STEADY)
        stack.restart_child("audit-ingest", kill=True, pause=DOWN)
        time.sleep(STEADY)
        stack.restart_child("audit", pause=DOWN)
        time.sleep(STEADY)
    finally:
        stop.set()
        for client in clients:
            client.join(60)

    counts = wait_for_entries(stack, outcomes.request_ids)

    ingest_log = [
        json.loads(line)
        for line in (stack.run_dir / "logs" / "audit-ingest.log")
        .read_text()
        .splitlines()
        if line.startswith("{")
    ]
    events = Counter(line["event"] for line in ingest_log)
    resumed = [
        line
        for line in ingest_log
        if line["event"] == "audit.ingest_started" and line["resumed"]
    ]
    # The ingester met the database outage with lines to store, and the
    # killed ingester's successor resumed from the committed offset.
    assert events["audit.store_failed"] > 0, events
    assert 1 == len(resumed), events
    assert ingest_pid != stack.child("audit-ingest").process.pid
    assert audit_pid != stack.child("audit").process.pid
    assert [] == outcomes.transport_errors
    assert [] == outcomes.missing_ids
    assert len(outcomes.request_ids) == len(set(outcomes.request_ids))
    assert outcomes.statuses["http 200"] > 0, outcomes.statuses
    assert outcomes.statuses["grpc OK"] > 0, outcomes.statuses
    assert outcomes.statuses["http 401"] > 0, outcomes.statuses
    assert outcomes.statuses["http 400"] > 0, outcomes.statuses
    assert outcomes.statuses["http 429"] > 0, outcomes.statuses
    assert outcomes.statuses["grpc UNAUTHENTICATED"] > 0, outcomes.statuses
    assert outcomes.statuses["grpc INVALID_ARGUMENT"] > 0, outcomes.statuses
    # The database outage and the audit service's restart were seen.
    assert outcomes.statuses["http 503"] > 0, outcomes.statuses
    assert outcomes.statuses["grpc UNAVAILABLE"] > 0, outcomes.statuses
    missing = set(outcomes.request_ids) - set(counts)
    assert set() == missing, (
        f"{len(missing)} of {len(outcomes.request_ids)} request ids have "
        f"no entry, e.g. {sorted(missing)[:5]}; outcomes "
        f"{dict(outcomes.statuses)}"
    )
    twice = {request_id: n for request_id, n in counts.items() if n != 1}
    assert {} == twice
    with psycopg.connect(stack.admin_database_url) as connection:
        stored_twice = connection.execute(
            "SELECT request_id, count(*) FROM audit.events"
            " GROUP BY request_id HAVING count(*) > 1 LIMIT 5"
        ).fetchall()
    assert [] == stored_twice
    verified = cli_process(stack, "audit", "verify", "--org", org.org_id)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    print(
        f"requests {len(outcomes.request_ids)}, outcomes "
        f"{dict(outcomes.statuses)}, gRPC request ids only in trailing "
        f"metadata {dict(outcomes.grpc_ids_in_trailers)}"
    )
