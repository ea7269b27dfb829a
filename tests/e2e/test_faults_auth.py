"""The auth service killed under load: every request 503, none passes.

With auth gone (SIGKILL, as in a crash) the edge has no decision to act
on, so it returns 503 (UNAVAILABLE over gRPC) to every request and
forwards none: the CDS, audit and billing services count no RPC in that
time. Once auth is back, requests pass again, and every request of the
run has its audit entry, the rejected ones included.
"""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.launcher.stack import health_status
from tests.e2e.fault_load import (
    AUDIT_PAGE_PATH,
    REVIEW_PATH,
    RULES_ONLY,
    LoadClients,
    Recorder,
    grpc_review_sender,
    missing_entries,
    rest_sender,
    review_sender,
    service_rpcs,
    write_figures,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
# Seconds of load before the kill, while auth is down and after it is back.
STEADY = 3.0
DOWN = 5.0
# Seconds after the kill for requests already past auth to reach their
# service, before the count of RPCs that services served starts.
SETTLE = 1.0
# Seconds by which requests pass again once auth reports SERVING.
RECOVERY_LIMIT = 5.0
SERVICES = ("cds", "audit", "billing")


def wait_until_serving(stack, name: str, timeout: float = 90.0) -> None:
    address = f"127.0.0.1:{stack.child(name).environment['ARXIO_PORT']}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health_status(address, stack.certs_dir) == SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} was not SERVING within {timeout:g} s")


def test_killed_auth_lets_nothing_through():
    with own_stack() as stack:
        edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
        org = Organization(stack, "enterprise")
        key = {"x-api-key": org.api_key}
        senders = [
            review_sender(edge, key),
            rest_sender(
                edge,
                "review without key",
                "POST",
                REVIEW_PATH,
                RULES_ONLY,
                {},
                expected=401,
            ),
            rest_sender(edge, "audit page", "GET", AUDIT_PAGE_PATH, None, key),
            rest_sender(edge, "usage", "GET", "/v1/billing/usage", None, key),
            grpc_review_sender(edge, org.api_key),
        ]
        auth = stack.child("auth")
        recorder = Recorder()
        with LoadClients(recorder, senders):
            time.sleep(STEADY)
            killing = time.monotonic()
            auth.kill()
            # auth has exited: no request started from here on can pass.
            killed = time.monotonic()
            time.sleep(SETTLE)
            served_before = {
                name: service_rpcs(stack, name) for name in SERVICES
            }
            time.sleep(DOWN)
            served_after = {
                name: service_rpcs(stack, name) for name in SERVICES
            }
            restarting = time.monotonic()
            auth.start()
            wait_until_serving(stack, "auth")
            serving = time.monotonic()
            time.sleep(STEADY)
        outcomes = recorder.snapshot()
        down = recorder.started_between(killed, restarting)
        after = recorder.started_between(serving, float("inf"))
        first_pass = min((o.finished for o in after if o.ok), default=None)
        recovered_after = None
        if first_pass is not None:
            recovered_after = round(first_pass - serving, 2)
        unavailable = [
            o for o in down if o.status in ("503", "grpc UNAVAILABLE")
        ]
        missing = missing_entries(stack, recorder.request_ids())
        reached = {
            name: served_after[name] - served_before[name] for name in SERVICES
        }
        write_figures(
            "auth-killed",
            {
                "summary": f"auth killed with SIGKILL for {DOWN:g} s under "
                "load",
                "requests_sent": len(outcomes),
                "requests_failed": sum(not o.ok for o in outcomes),
                "recovered_after_seconds": recovered_after,
                "entries_lost": len(missing),
                "notes": (
                    f"{len(down)} requests while auth was down, "
                    f"{len(unavailable)} of them 503 or UNAVAILABLE; RPCs "
                    "that reached a "
                    f"service meanwhile: {int(sum(reached.values()))}; auth "
                    f"took {serving - restarting:.2f} s to restart"
                ),
            },
        )

        assert down, "no request was sent while auth was down"
        assert len(down) == len(unavailable)
        assert {name: 0 for name in SERVICES} == reached
        assert [] == [
            (o.kind, o.status)
            for o in outcomes
            if o.finished < killing and not o.ok
        ]
        assert recovered_after is not None
        assert recovered_after <= RECOVERY_LIMIT
        assert [] == [
            (o.kind, o.status)
            for o in after
            if o.started > serving + RECOVERY_LIMIT and not o.ok
        ]
        assert set() == missing
