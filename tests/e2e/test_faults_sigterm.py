"""SIGTERM to one of two replicas under load: nothing fails.

The replica reports NOT_SERVING at once, keeps serving until Envoy's
health checks stop sending it requests, then lets in-flight RPCs finish.
Model reviews that take a second each are in flight when the signal
arrives, over REST and beside rules-only reviews over native gRPC.
"""

import time

import pytest
from grpc_health.v1 import health_pb2

from tests.e2e.fault_load import (
    REVIEW_PATH,
    RULES_ONLY,
    WITH_MODEL,
    HealthProbe,
    LoadClients,
    Recorder,
    SlowModelServer,
    grpc_review_sender,
    has_interaction,
    latency_ms,
    missing_entries,
    rest_sender,
    service_rpcs,
    write_figures,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Seconds each model call takes at the stand-in model server.
MODEL_DELAY = 1.0
# Seconds of load before the signal and after the replica exited.
STEADY = 3.0


def model_review_ok(review: dict) -> str | None:
    problem = has_interaction(review)
    if problem is None and review["modelReview"]["status"] != "OK":
        problem = f"model review {review['modelReview']['status']}"

    return problem


@pytest.fixture(scope="module")
def replicated_stack():
    with SlowModelServer(MODEL_DELAY) as model:
        with own_stack(
            ollama_host=model.url,
            replicas={"cds": 2, "auth": 2},
            model_timeout=10.0,
        ) as stack:
            yield stack


def terminate_under_load(stack, child_name: str) -> dict:
    """SIGTERM `child_name` under load; return what the clients saw."""
    edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
    org = Organization(stack, "enterprise")
    key = {"x-api-key": org.api_key}
    senders = [
        rest_sender(edge, "review", "POST", REVIEW_PATH, RULES_ONLY, key),
        rest_sender(edge, "review", "POST", REVIEW_PATH, RULES_ONLY, key),
        rest_sender(
            edge,
            "model review",
            "POST",
            REVIEW_PATH,
            WITH_MODEL,
            key,
            model_review_ok,
        ),
        rest_sender(
            edge,
            "model review",
            "POST",
            REVIEW_PATH,
            WITH_MODEL,
            key,
            model_review_ok,
        ),
        grpc_review_sender(edge, org.api_key),
    ]
    child = stack.child(child_name)
    address = f"127.0.0.1:{child.environment['ARXIO_PORT']}"
    recorder = Recorder()
    with HealthProbe(address, stack.certs_dir) as probe:
        with LoadClients(recorder, senders):
            time.sleep(STEADY)
            served_before = service_rpcs(stack, child_name)
            signalled = time.monotonic()
            child.stop()
            exited = time.monotonic()
            time.sleep(STEADY)
    outcomes = recorder.snapshot()
    in_flight = [
        o
        for o in outcomes
        if o.kind == "model review" and o.started < signalled < o.finished
    ]

    return {
        "outcomes": outcomes,
        "failed": [o for o in outcomes if not o.ok],
        "in_flight_model_reviews": in_flight,
        "served_before": served_before,
        "signalled": signalled,
        "exited": exited,
        "not_serving": probe.first(NOT_SERVING, after=signalled),
        "unreachable": probe.first(None, after=signalled),
        "exit_code": child.process.returncode,
        "missing": missing_entries(
            stack, [o.request_id for o in outcomes if o.request_id]
        ),
    }


@pytest.mark.parametrize("child_name", ["cds-2", "auth-2"])
def test_replica_stops_without_failures(replicated_stack, child_name):
    seen = terminate_under_load(replicated_stack, child_name)
    outcomes = seen["outcomes"]
    failed = seen["failed"]
    write_figures(
        f"sigterm-{child_name}",
        {
            "summary": f"SIGTERM to {child_name}, one of two replicas, "
            "under load",
            "requests_sent": len(outcomes),
            "requests_failed": len(failed),
            "recovered_after_seconds": None,
            "entries_lost": len(seen["missing"]),
            "notes": (
                f"{len(seen['in_flight_model_reviews'])} model reviews in "
                "flight at the signal; NOT_SERVING after "
                f"{seen['not_serving'] - seen['signalled']:.2f} s, port "
                f"closed after {seen['unreachable'] - seen['signalled']:.2f}"
                f" s, exit after {seen['exited'] - seen['signalled']:.2f} s"
            ),
            "latency": {
                kind: latency_ms([o for o in outcomes if o.kind == kind])
                for kind in ("review", "model review", "grpc review")
            },
        },
    )

    assert [] == [(o.kind, o.status, o.detail) for o in failed]
    assert 0 == seen["exit_code"]
    assert seen["in_flight_model_reviews"], "no model review was in flight"
    assert seen["served_before"] > 0
    assert seen["not_serving"] is not None
    assert seen["unreachable"] is not None
    assert seen["not_serving"] < seen["unreachable"]
    assert set() == seen["missing"]
