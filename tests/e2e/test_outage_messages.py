"""Errors while PostgreSQL or the auth service is down, as clients see them.

REST clients get the google.rpc.Status JSON; native gRPC clients get
UNAVAILABLE with a plain grpc-message, never that JSON as message text.
"""

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
UNAVAILABLE_MESSAGE = "authorization is unavailable: retry shortly"


@pytest.fixture(scope="module")
def outage_stack():
    """A suite of its own, since these tests stop its parts."""
    with own_stack() as running:
        yield running


@pytest.fixture(scope="module")
def edge(outage_stack) -> EdgeClient:
    return EdgeClient(
        outage_stack.edge_port, outage_stack.certs_dir / "ca.crt"
    )


@pytest.fixture(scope="module")
def org(outage_stack) -> Organization:
    """An organization made while everything is up."""
    return Organization(outage_stack)


def grpc_review_error(edge: EdgeClient, api_key: str) -> grpc.RpcError:
    request = cds_pb2.ClinicalReviewRequest(
        options=cds_pb2.ReviewOptions(model_review=False)
    )
    with edge.channel() as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ClinicalReview(
                request, metadata=[("x-api-key", api_key)], timeout=30
            )

    return raised.value


def assert_unavailable(edge: EdgeClient, api_key: str) -> None:
    response = edge.request(
        "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": api_key}
    )
    error = grpc_review_error(edge, api_key)

    assert 503 == response.status, response.body
    assert 14 == response.json()["code"]
    assert UNAVAILABLE_MESSAGE == response.json()["message"]
    assert grpc.StatusCode.UNAVAILABLE == error.code()
    assert UNAVAILABLE_MESSAGE == error.details()


def test_database_down(outage_stack, edge, org):
    outage_stack.stop_database()
    try:
        assert_unavailable(edge, org.api_key)
    finally:
        outage_stack.start_database()


def test_auth_service_down(outage_stack, edge, org):
    """Runs last in this module: the auth service stays stopped."""
    outage_stack.child("auth").stop()

    assert_unavailable(edge, org.api_key)
