"""The auth decision rejects a body over the edge's limit with 413, under
the organization of the request's key."""

import grpc
import pytest

from services.auth.authorization import check_response
from services.auth.decision import RequestFacts, _size_denial
from services.launcher.envoy_config import MAX_REQUEST_BYTES

IDENTITY = {
    "action": "cds.clinical_review",
    "resource_type": "clinical_review",
    "org_id": "6f1c2e0a-3b1d-4c59-9d8e-2a7b5c4d3e10",
    "key_id": "key_0123456789abcdef",
}


def facts(body: bytes, content_type: str) -> RequestFacts:
    return RequestFacts(
        http_method="POST",
        path="/v1/cds/clinical-review",
        headers={"content-type": content_type},
        request_id="0b7c6a52-9a7e-4c1e-9a51-3f1f3c2f5b0e",
        body=body,
    )


@pytest.mark.parametrize("size", [0, 1, MAX_REQUEST_BYTES])
def test_body_at_limit_passes(size):
    assert _size_denial(facts(b"x" * size, "application/json"), {}) is None


@pytest.mark.parametrize(
    ("content_type", "code"),
    [
        ("application/json", grpc.StatusCode.INVALID_ARGUMENT),
        ("application/grpc", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_one_byte_over_gets_413(content_type, code):
    request = facts(b"x" * (MAX_REQUEST_BYTES + 1), content_type)

    decision = _size_denial(request, IDENTITY)

    assert decision is not None
    assert not decision.allowed
    assert 413 == decision.http_status
    assert code == decision.code
    assert decision.message.startswith("request body too large")
    assert IDENTITY == decision.metadata


def test_denial_carries_identity_to_envoy():
    """Envoy's 413 and its access-log line get the key's organization."""
    request = facts(b"x" * (MAX_REQUEST_BYTES + 1), "application/json")
    decision = _size_denial(request, IDENTITY)

    response = check_response(request, decision)

    assert 413 == response.denied_response.status.code
    metadata = dict(response.dynamic_metadata)
    assert IDENTITY["org_id"] == metadata["org_id"]
    assert IDENTITY["key_id"] == metadata["key_id"]
    assert (
        str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        == (metadata["grpc_status"])
    )
