"""What the audit trail stores of a request comes from the edge and the
auth decision, never from a header that the client sent.

The edge copies each request's method and content type into the
x-arxio-original-method and x-arxio-original-content-type headers before
the transcoder changes them. The requests here send their own copies of
both: requests that Envoy rejects itself, at each stage from its HTTP
codec to the transcoder, and requests that it forwards. Their stored
entries must hold the real method, and the status and code that the
real content type gives.
"""

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from services.launcher.envoy_config import MAX_REQUEST_BYTES
from tests.e2e.edge_instance import overloaded_edge
from tests.e2e.test_audit import stored_rows
from tests.e2e.test_audit_request_ids import wait_for_overload
from tests.e2e.test_edge_identity_headers import access_log_line
from tests.e2e.test_edge_replies import raw_exchange
from tests.edge import EdgeClient

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
SPOOFED_METHOD = "SPOOFED"
# A gRPC content type: an entry read as a gRPC call's would take its
# status from grpc-status instead of from the JSON error the client got.
SPOOFED_CONTENT_TYPE = "application/grpc+spoofed"
SPOOFED_HEADERS = [
    f"x-arxio-original-method: {SPOOFED_METHOD}",
    f"x-arxio-original-content-type: {SPOOFED_CONTENT_TYPE}",
]
KEY = "x-api-key: {api_key}"
OVERSIZED_BODY = b"{" + b" " * MAX_REQUEST_BYTES + b"}"

# Each request: its request line, its other headers (KEY is replaced by
# the organization's key), its body, then the reply's status and what the
# entry must store: the method and the code of the client's JSON error.
# Envoy's HTTP/1 codec passes no header of a request it rejects, so those
# entries have no method.
REQUESTS = {
    "no Host header": (
        "GET /v1/audit HTTP/1.1",
        ["connection: close"],
        b"",
        400,
        "GET",
        3,
    ),
    "OPTIONS *": (
        "OPTIONS * HTTP/1.1",
        ["host: localhost", "connection: close"],
        b"",
        404,
        "OPTIONS",
        5,
    ),
    "WebSocket upgrade": (
        "GET /v1/audit HTTP/1.1",
        ["host: localhost", "connection: upgrade", "upgrade: websocket"],
        b"",
        403,
        "GET",
        7,
    ),
    "HTTP/1.0": (
        "GET /v1/billing/usage HTTP/1.0",
        ["host: localhost"],
        b"",
        426,
        "",
        9,
    ),
    "101 headers": (
        "GET /v1/billing/usage HTTP/1.1",
        ["host: localhost", "connection: close"]
        + [f"x-filler-{index}: v" for index in range(101)],
        b"",
        431,
        "",
        3,
    ),
    "gzip transfer encoding": (
        f"POST {REVIEW_PATH} HTTP/1.1",
        [
            "host: localhost",
            "transfer-encoding: gzip, chunked",
            "connection: close",
        ],
        b"0\r\n\r\n",
        400,
        "",
        3,
    ),
    "unknown query parameter": (
        "GET /v1/audit?zzunknown=1 HTTP/1.1",
        ["host: localhost", KEY, "connection: close"],
        b"",
        400,
        "GET",
        3,
    ),
    "malformed JSON body": (
        f"POST {REVIEW_PATH} HTTP/1.1",
        [
            "host: localhost",
            KEY,
            "content-type: application/json",
            "content-length: 5",
            "connection: close",
        ],
        b"{bad!",
        400,
        "POST",
        3,
    ),
    "body over the limit": (
        f"POST {REVIEW_PATH} HTTP/1.1",
        [
            "host: localhost",
            KEY,
            "content-type: application/json",
            f"content-length: {len(OVERSIZED_BODY)}",
            "connection: close",
        ],
        OVERSIZED_BODY,
        413,
        "POST",
        3,
    ),
    "text/plain body": (
        f"POST {REVIEW_PATH} HTTP/1.1",
        [
            "host: localhost",
            KEY,
            "content-type: text/plain",
            "content-length: 2",
            "connection: close",
        ],
        b"{}",
        415,
        "POST",
        3,
    ),
    "no API key": (
        "GET /v1/audit HTTP/1.1",
        ["host: localhost", "connection: close"],
        b"",
        401,
        "GET",
        16,
    ),
    "forwarded GET": (
        "GET /v1/audit?pageSize=1 HTTP/1.1",
        ["host: localhost", KEY, "connection: close"],
        b"",
        200,
        "GET",
        0,
    ),
    "forwarded DELETE": (
        "DELETE /v1/keys/key_0123456789abcdef HTTP/1.1",
        ["host: localhost", KEY, "connection: close"],
        b"",
        404,
        "DELETE",
        5,
    ),
}


def spoofing_request(
    request_line: str, headers: list[str], body: bytes, api_key: str
) -> bytes:
    """Return an HTTP/1 request that carries the spoofed copies."""
    lines = [request_line, *SPOOFED_HEADERS]
    lines += [header.format(api_key=api_key) for header in headers]

    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_real_values(
    stack, reply, method: str, status: int, code: int
) -> None:
    """Check a reply and its stored entry against the real values."""
    reply_status, headers, _ = reply
    request_id = headers["x-request-id"]
    [row] = stored_rows(stack, [request_id]).values()
    line = access_log_line(stack, request_id)

    assert status == reply_status
    assert method == row[6]
    assert status == row[4]
    assert code == row[5]
    assert "spoofed" not in str(line).lower()
    # A spoofed gRPC type must not turn the reply into a gRPC one.
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("name", list(REQUESTS))
def test_stored_values_are_real(stack, edge, new_org, name):
    request_line, headers, body, status, method, code = REQUESTS[name]
    request = spoofing_request(request_line, headers, body, new_org().api_key)

    reply = raw_exchange(edge, request)

    assert_real_values(stack, reply, method, status, code)


def test_headers_timeout_stores_real_values(stack, edge):
    """Headers that never finish get 408 after 10 seconds."""
    request = "\r\n".join(
        ["GET /v1/audit HTTP/1.1", "host: localhost", *SPOOFED_HEADERS, ""]
    ).encode()

    reply = raw_exchange(edge, request, timeout=30)

    assert_real_values(stack, reply, "", 408, 4)


def test_overload_reply_stores_real_values(stack, tmp_path):
    """The overload manager's 503 comes before any filter runs."""
    instance = overloaded_edge(stack, tmp_path)
    overloaded = EdgeClient(instance.port, stack.certs_dir / "ca.crt")
    request = spoofing_request(
        "GET /v1/audit HTTP/1.1",
        ["host: localhost", "connection: close"],
        b"",
        "",
    )
    try:
        wait_for_overload(instance)
        reply = raw_exchange(overloaded, request)
    finally:
        # Envoy flushes its access log when it stops.
        instance.stop()

    assert_real_values(stack, reply, "GET", 503, 14)


def test_grpc_call_stores_real_values(stack, edge, new_org):
    """Spoofed copies in a native gRPC call's metadata change nothing."""
    org = new_org()
    metadata = [
        ("x-api-key", org.api_key),
        ("x-arxio-original-method", SPOOFED_METHOD),
        ("x-arxio-original-content-type", "application/json"),
    ]
    request = cds_pb2.ClinicalReviewRequest(
        options=cds_pb2.ReviewOptions(model_review=False)
    )
    with edge.channel() as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        _, call = stub.ClinicalReview.with_call(
            request, metadata=metadata, timeout=30
        )
    request_id = dict(call.initial_metadata())["x-request-id"]

    [row] = stored_rows(stack, [request_id]).values()

    assert "POST" == row[6]
    assert 200 == row[4]
    assert 0 == row[5]
    assert "spoofed" not in str(access_log_line(stack, request_id)).lower()


class TestBodyOverLimit:
    """A body over the limit is filed under the organization of its key,
    and the organization finds the entry in GET /v1/audit."""

    def test_rest_413_in_org_audit(self, stack, edge, new_org):
        org = new_org()
        key = {"x-api-key": org.api_key}
        response = edge.request(
            "POST",
            REVIEW_PATH,
            OVERSIZED_BODY,
            key | {"content-type": "application/json"},
        )
        request_id = response.headers["x-request-id"]
        stored_rows(stack, [request_id])

        page = edge.request(
            "GET", "/v1/audit?statusCode=413&pageSize=10", headers=key
        ).json()

        assert 413 == response.status
        [event] = page["auditEvents"]
        assert request_id == event["requestId"]
        assert org.org_id == event["orgId"]
        assert org.key_id == event["keyId"]
        assert "POST" == event["method"]
        assert 3 == event["grpcStatus"]
        assert org.api_key not in str(access_log_line(stack, request_id))

    def test_grpc_over_limit_in_org_audit(self, stack, edge, new_org):
        org = new_org()
        key = {"x-api-key": org.api_key}
        request = cds_pb2.ClinicalReviewRequest(
            question="x" * (MAX_REQUEST_BYTES + 1)
        )
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    request, metadata=list(key.items()), timeout=30
                )
        metadata = dict(raised.value.initial_metadata())
        metadata |= dict(raised.value.trailing_metadata())
        request_id = metadata["x-request-id"]
        stored_rows(stack, [request_id])

        page = edge.request("GET", "/v1/audit?pageSize=50", headers=key)

        assert grpc.StatusCode.RESOURCE_EXHAUSTED == raised.value.code()
        [event] = [
            event
            for event in page.json()["auditEvents"]
            if event["requestId"] == request_id
        ]
        assert org.org_id == event["orgId"]
        assert org.key_id == event["keyId"]
        assert 8 == event["grpcStatus"]

    def test_without_key_gets_401(self, stack, edge):
        """The key is checked first, so a client without one learns
        nothing about its body."""
        response = edge.request(
            "POST",
            REVIEW_PATH,
            OVERSIZED_BODY,
            {"content-type": "application/json"},
        )

        [row] = stored_rows(stack, [response.headers["x-request-id"]]).values()

        assert 401 == response.status
        assert row[1] is None
