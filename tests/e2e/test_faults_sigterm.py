"""SIGTERM to one of two replicas under load: nothing fails.

The replica reports NOT_SERVING at once, keeps serving until Envoy's
health checks stop sending it requests, then lets in-flight RPCs finish.
Model reviews that take a second each are in flight when the signal
arrives, over REST and beside rules-only reviews over native gRPC. One
RPC is held open on the stopped replica itself and must end OK. For cds
it is a model review called directly. For auth it is a Check called
directly, whose key lookup waits on a table lock that the test releases
after the signal.
"""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import psycopg
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2

from bench.auth import check_request
from tests.e2e.fault_load import (
    REVIEW_PATH,
    RULES_ONLY,
    WITH_MODEL,
    HealthProbe,
    LoadClients,
    Recorder,
    SlowModelServer,
    grpc_review_request,
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
# Seconds between the start of the held RPC and the signal, and the
# seconds after the signal for which the table lock holds auth's Check.
HELD_START = 0.5
HELD_AFTER_SIGNAL = 1.0


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
            # The load's keys stay cached while the table lock of
            # held_call() holds one Check, so only that Check reads
            # auth.api_keys. With the default 1 s the load's Checks wait
            # on the lock too, and Envoy responds to them with 503.
            service_environment={"auth": {"ARXIO_AUTH_CACHE_SECONDS": "60"}},
        ) as stack:
            yield stack


def replica_channel(stack, child_name: str) -> grpc.Channel:
    """Open a channel to one replica as the edge, with its certificate."""
    certs = stack.certs_dir
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.crt").read_bytes(),
        private_key=(certs / "envoy.key").read_bytes(),
        certificate_chain=(certs / "envoy.crt").read_bytes(),
    )
    port = stack.child(child_name).environment["ARXIO_PORT"]

    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def model_review_call(channel: grpc.Channel) -> Callable[[], str]:
    """Return a call of one model review, which returns its status."""
    stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
    request = grpc_review_request(model_review=True)

    def call() -> str:
        reply = stub.ClinicalReview(request, timeout=30)
        return cds_pb2.ModelReview.Status.Name(reply.model_review.status)

    return call


def check_call(channel: grpc.Channel, api_key: str) -> Callable[[], str]:
    """Return a call of auth's Check for `api_key`, which returns OK or
    the reason for the denial."""
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)

    def call() -> str:
        reply = stub.Check(check_request(api_key), timeout=30)
        if reply.status.code != 0:
            return f"denied with code {reply.status.code}"
        return "OK"

    return call


def timed_call(call: Callable[[], str]) -> dict:
    started = time.monotonic()
    try:
        status = call()
    except grpc.RpcError as error:
        status = f"grpc {error.code().name}: {error.details()}"

    return {"started": started, "finished": time.monotonic(), "status": status}


@contextlib.contextmanager
def held_call(
    stack, child_name: str, api_key: str
) -> Iterator[Callable[[], Future]]:
    """Start one RPC on `child_name` itself that is still running when
    the block's body sends the signal.

    A cds model review takes MODEL_DELAY seconds at the model server. An
    auth Check for a key that no Check has looked up yet, so that it is in
    no credential cache, waits on an exclusive lock of auth.api_keys. The
    body calls the yielded function right before the signal: it releases
    the lock HELD_AFTER_SIGNAL seconds later and returns the call's future,
    whose result has the keys started, finished and status.
    """
    channel = replica_channel(stack, child_name)
    pool = ThreadPoolExecutor(max_workers=1)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(channel.close)
        cleanup.callback(pool.shutdown)
        lock = None
        if child_name.startswith("auth"):
            call = check_call(channel, api_key)
            lock = psycopg.connect(stack.admin_database_url)
            cleanup.callback(lock.close)
            lock.execute("LOCK TABLE auth.api_keys IN ACCESS EXCLUSIVE MODE")
        else:
            call = model_review_call(channel)
        future = pool.submit(timed_call, call)
        time.sleep(HELD_START)

        def release() -> Future:
            if lock is not None:
                release = threading.Timer(HELD_AFTER_SIGNAL, lock.rollback)
                release.start()
                cleanup.callback(release.join)
            return future

        yield release


def terminate_under_load(stack, child_name: str) -> dict:
    """SIGTERM `child_name` under load; return what the clients saw."""
    edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
    org = Organization(stack, "enterprise")
    # Its key is used only by the call held open on the replica.
    held_org = Organization(stack, "enterprise")
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
            with held_call(stack, child_name, held_org.api_key) as release:
                # SIGTERM follows at once, in stop().
                held_future = release()
                signalled = time.monotonic()
                child.stop()
                exited = time.monotonic()
                held = held_future.result(timeout=60)
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
        "held": held,
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
                "flight at the signal, and one call held open on "
                f"{child_name} itself, which ended "
                f"{seen['held']['status']} "
                f"{seen['held']['finished'] - seen['signalled']:.2f} s after "
                "the signal; NOT_SERVING after "
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
    held = seen["held"]
    assert held["started"] < seen["signalled"]
    assert held["finished"] > seen["signalled"], "the held call ended early"
    assert held["status"] == "OK", f"the held call on {child_name} failed"
    assert 0 == seen["exit_code"]
    assert seen["in_flight_model_reviews"], "no model review was in flight"
    assert seen["served_before"] > 0
    assert seen["not_serving"] is not None
    assert seen["unreachable"] is not None
    assert seen["not_serving"] < seen["unreachable"]
    assert set() == seen["missing"]
