"""PostgreSQL down: the edge fails closed, health reports NOT_SERVING,
and the suite recovers without a restart once the database is back."""

import time

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from grpc_health.v1 import health_pb2

from services.launcher.stack import (
    health_status,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT = 30.0


@pytest.fixture
def outage_stack():
    """A suite of its own, since this test stops its database."""
    with own_stack() as running:
        yield running


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}")
        time.sleep(0.25)


def auth_health(stack) -> int:
    return health_status(f"127.0.0.1:{stack.ports['auth']}", stack.certs_dir)


def grpc_code(stack, api_key: str) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(
        (stack.certs_dir / "ca.crt").read_bytes()
    )
    with grpc.secure_channel(
        f"localhost:{stack.edge_port}", credentials
    ) as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        try:
            stub.ClinicalReview(
                cds_pb2.ClinicalReviewRequest(
                    options=cds_pb2.ReviewOptions(model_review=False)
                ),
                metadata=[("x-api-key", api_key)],
                timeout=30,
            )
        except grpc.RpcError as error:
            return error.code()

    return grpc.StatusCode.OK


def test_fails_closed_and_recovers(outage_stack):
    edge = EdgeClient(
        outage_stack.edge_port, outage_stack.certs_dir / "ca.crt"
    )
    org = Organization(outage_stack)
    key = {"x-api-key": org.api_key}
    assert 200 == edge.request("POST", REVIEW_PATH, RULES_ONLY, key).status
    pids = {child.name: child.process.pid for child in outage_stack.children}

    outage_stack.stop_database()

    down = edge.request("POST", REVIEW_PATH, RULES_ONLY, key)
    assert 503 == down.status, down.body
    assert 14 == down.json()["code"]
    assert grpc.StatusCode.UNAVAILABLE == grpc_code(outage_stack, org.api_key)
    # The operator token needs no database, so the operator API is reached
    # and must return UNAVAILABLE rather than a failure of its own.
    operator = edge.request(
        "GET",
        "/v1/operator/organizations",
        None,
        {"authorization": f"Bearer {outage_stack.operator_token}"},
    )
    assert 503 == operator.status, operator.body
    assert 14 == operator.json()["code"]
    wait_for(lambda: auth_health(outage_stack) == NOT_SERVING, "NOT_SERVING")

    outage_stack.start_database()

    wait_for(
        lambda: (
            edge.request("POST", REVIEW_PATH, RULES_ONLY, key).status == 200
        ),
        "a review to pass again",
    )
    wait_for(lambda: auth_health(outage_stack) == SERVING, "SERVING")
    assert grpc.StatusCode.OK == grpc_code(outage_stack, org.api_key)
    assert pids == {
        child.name: child.process.pid for child in outage_stack.children
    }
