"""PostgreSQL restarted under load: 503 only while it is down.

Reviews over REST and native gRPC, audit pages and billing usage run
throughout. Every request started after the database stopped fails with
503 (UNAVAILABLE over gRPC) until it is back, and the health of each
service that uses it (auth, audit, billing) turns NOT_SERVING. Within five
seconds of the database's return every request succeeds again and those
services report SERVING, with the same service processes, and every
request has its audit entry. The single-request
version of this outage is in test_database_outage.py.
"""

import contextlib
import time

import pytest
from grpc_health.v1 import health_pb2

from tests.e2e.fault_load import (
    AUDIT_PAGE_PATH,
    HealthProbe,
    LoadClients,
    Recorder,
    grpc_review_sender,
    latency_ms,
    missing_entries,
    rest_sender,
    review_sender,
    write_figures,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Seconds of load before the stop, while the database is down, and after
# its return.
STEADY = 3.0
DOWN = 5.0
AFTER = 8.0
# Seconds after the database's return by which every request succeeds.
RECOVERY_LIMIT = 5.0
FAILED_STATUSES = {"503", "grpc UNAVAILABLE"}
# Services that connect to PostgreSQL; cds does not.
DATABASE_SERVICES = ("auth", "audit", "billing")


def test_restart_fails_only_while_down():
    with own_stack() as stack:
        edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
        org = Organization(stack, "enterprise")
        key = {"x-api-key": org.api_key}
        senders = [
            review_sender(edge, key),
            rest_sender(edge, "audit page", "GET", AUDIT_PAGE_PATH, None, key),
            rest_sender(edge, "usage", "GET", "/v1/billing/usage", None, key),
            grpc_review_sender(edge, org.api_key),
        ]
        pids = {child.name: child.process.pid for child in stack.children}
        recorder = Recorder()
        with contextlib.ExitStack() as probes:
            health = {
                name: probes.enter_context(
                    HealthProbe(
                        f"127.0.0.1:{stack.ports[name]}", stack.certs_dir
                    )
                )
                for name in DATABASE_SERVICES
            }
            with LoadClients(recorder, senders):
                time.sleep(STEADY)
                stopping = time.monotonic()
                stack.stop_database()
                # PostgreSQL has exited: no request started from here on
                # can reach it.
                stopped = time.monotonic()
                time.sleep(DOWN)
                restarting = time.monotonic()
                stack.start_database()
                returned = time.monotonic()
                time.sleep(AFTER)
        outcomes = recorder.snapshot()
        failed = [o for o in outcomes if not o.ok]
        late = [o for o in failed if o.started >= returned]
        recovered_after = max(
            (o.finished - returned for o in late), default=0.0
        )
        missing = missing_entries(stack, recorder.request_ids())
        write_figures(
            "database-restart",
            {
                "summary": f"PostgreSQL stopped for {DOWN:g} s under load",
                "requests_sent": len(outcomes),
                "requests_failed": len(failed),
                "recovered_after_seconds": round(recovered_after, 2),
                "entries_lost": len(missing),
                "notes": (
                    f"{len(failed)} failures, all 503 or UNAVAILABLE, "
                    f"{len(late)} of them after the database's return; "
                    f"its start took {returned - restarting:.2f} s"
                ),
                "latency": {
                    kind: latency_ms(
                        [o for o in outcomes if o.kind == kind and o.ok]
                    )
                    for kind in (
                        "review",
                        "audit page",
                        "usage",
                        "grpc review",
                    )
                },
            },
        )

        before = [o for o in outcomes if o.finished < stopping]
        down = recorder.started_between(stopped, restarting)
        assert before, "no request finished before the stop"
        assert [] == [o.status for o in before if not o.ok]
        assert down, "no request was sent while the database was down"
        assert [] == [
            (o.kind, o.started - stopping, o.seconds) for o in down if o.ok
        ], "a request passed while the database was down"
        assert set() == {o.status for o in failed} - FAILED_STATUSES
        assert [] == [o for o in failed if o.finished < stopping]
        assert recovered_after <= RECOVERY_LIMIT
        assert [] == [
            o.status
            for o in outcomes
            if o.started > returned + RECOVERY_LIMIT and not o.ok
        ]
        for name, probe in health.items():
            not_serving = probe.first(NOT_SERVING, after=stopping)
            assert not_serving is not None, f"{name} stayed SERVING"
            serving = probe.first(SERVING, after=returned)
            assert serving is not None, f"{name} did not report SERVING"
            assert serving - returned <= RECOVERY_LIMIT, name
        assert pids == {
            child.name: child.process.pid for child in stack.children
        }
        assert set() == missing
