"""The edge's own replies: every one safe, JSON and traceable.

Envoy replies to some requests itself (431, 426, 415, 404, the API
description) before any service sees them. Each reply must carry the
security headers, an X-Request-ID and, for errors, the google.rpc.Status
JSON shape with that request id in its details.
"""

import json
import socket
import ssl

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from services.launcher.edge_guards import API_DESCRIPTION_FILE
from tests.fuzz.checks import error_shape_problems, response_problems
from tests.suite import Organization

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "warfarin"}],
    "options": {"modelReview": False},
}


@pytest.fixture(scope="module")
def key(stack) -> dict:
    return {"x-api-key": Organization(stack, "enterprise").api_key}


def raw_exchange(edge, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw HTTP/1.x bytes over TLS and parse the reply."""
    context = ssl.create_default_context(cafile=str(edge.ca_file))
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", edge.port), 10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()

    return status, headers, body


def assert_safe_error(status, headers, body, expected_status) -> dict:
    assert expected_status == status, body
    assert [] == response_problems("GET", status, headers, body)

    return json.loads(body)


class TestHeaderLimits:
    def test_too_many_headers_gets_431(self, edge):
        """101 headers get 431 with a request id in header and body."""
        extra = "".join(f"x-filler-{i}: v\r\n" for i in range(101))
        request = (
            "GET /v1/billing/usage HTTP/1.1\r\nhost: localhost\r\n"
            f"{extra}connection: close\r\n\r\n"
        ).encode()

        status, headers, body = raw_exchange(edge, request)

        error = assert_safe_error(status, headers, body, 431)
        assert "at most 100 headers" in error["message"]

    def test_oversized_header_gets_431(self, edge):
        """A 40 KB header gets 431 in the same safe shape."""
        request = (
            "GET /v1/billing/usage HTTP/1.1\r\nhost: localhost\r\n"
            f"x-big: {'a' * 40_000}\r\nconnection: close\r\n\r\n"
        ).encode()

        status, headers, body = raw_exchange(edge, request)

        assert_safe_error(status, headers, body, 431)

    def test_http_10_gets_426(self, edge):
        request = b"GET /v1/billing/usage HTTP/1.0\r\nhost: localhost\r\n\r\n"

        status, headers, body = raw_exchange(edge, request)

        error = assert_safe_error(status, headers, body, 426)
        assert "HTTP/1.1" in error["message"]

    def test_request_ids_of_early_replies_unique(self, edge):
        """Replies sent before the headers were read get fresh ids."""
        request = b"GET / HTTP/1.0\r\n\r\n"

        first = raw_exchange(edge, request)[1]["x-request-id"]
        second = raw_exchange(edge, request)[1]["x-request-id"]

        assert first != second

    def test_underscore_header_dropped(self, edge, key):
        """x_api_key is not read as x-api-key."""
        response = edge.request(
            "GET", "/v1/billing/usage", headers={"x_api_key": key["x-api-key"]}
        )

        assert 401 == response.status


class TestContentTypes:
    @pytest.mark.parametrize(
        "content_type",
        [
            "text/plain",
            "application/xml",
            "multipart/form-data; boundary=x",
            "application/json-patch+json",
        ],
    )
    def test_non_json_body_gets_415(self, edge, key, content_type):
        """A JSON route rejects other content types, whatever the body."""
        response = edge.request(
            "POST",
            REVIEW_PATH,
            json.dumps(RULES_ONLY).encode(),
            key | {"content-type": content_type},
        )

        error = assert_safe_error(
            response.status, response.headers, response.body, 415
        )
        assert "application/json" in error["message"]

    @pytest.mark.parametrize(
        "content_type",
        [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
        ],
    )
    def test_json_variants_accepted(self, edge, key, content_type):
        response = edge.request(
            "POST",
            REVIEW_PATH,
            json.dumps(RULES_ONLY).encode(),
            key | {"content-type": content_type},
        )

        assert 200 == response.status, response.body

    def test_grpc_web_on_rest_path_gets_404(self, edge, key):
        response = edge.request(
            "GET",
            "/v1/billing/usage",
            headers=key | {"content-type": "application/grpc-web+proto"},
        )

        error = assert_safe_error(
            response.status, response.headers, response.body, 404
        )
        assert "REST path" in error["message"]

    def test_grpc_on_rest_path_is_unimplemented(self, edge, key):
        """A gRPC call to a REST path fails instead of returning nothing."""
        with edge.channel() as channel:
            call = channel.unary_unary(
                REVIEW_PATH,
                request_serializer=lambda raw: raw,
                response_deserializer=lambda raw: raw,
            )
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", metadata=list(key.items()), timeout=30)

        assert grpc.StatusCode.UNIMPLEMENTED == raised.value.code()
        assert "ClinicalReview" in raised.value.details()

    def test_grpc_message_over_64_kib_rejected(self, edge, key):
        """Native gRPC gets the same 64 KiB limit as REST."""
        request = cds_pb2.ClinicalReviewRequest(question="x" * 70_000)
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    request, metadata=list(key.items()), timeout=30
                )

        # Envoy maps a local 413 to gRPC's UNKNOWN.
        assert grpc.StatusCode.UNKNOWN == raised.value.code()
        assert "too large" in raised.value.details()

    def test_query_on_body_route_rejected(self, edge, key):
        """A query parameter cannot slip a field past the body check."""
        response = edge.request(
            "POST", f"{REVIEW_PATH}?question=hi", RULES_ONLY, key
        )

        error = assert_safe_error(
            response.status, response.headers, response.body, 400
        )
        assert "query" in error["message"]
        assert "findings" not in error

    def test_empty_post_needs_no_content_type(self, edge, key):
        """A POST without a body passes the content type guard."""
        response = edge.request("POST", "/v1/billing/portal", headers=key)

        assert 415 != response.status


class TestPaths:
    def test_unknown_path_gets_404_json(self, edge):
        response = edge.request("GET", "/no/such/route")

        assert_safe_error(
            response.status, response.headers, response.body, 404
        )

    def test_options_without_origin_gets_404(self, edge):
        """With no origins configured every OPTIONS is a JSON 404."""
        response = edge.request(
            "OPTIONS",
            REVIEW_PATH,
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
            },
        )

        assert_safe_error(
            response.status, response.headers, response.body, 404
        )
        assert not [
            name for name in response.headers if name.startswith("access-")
        ]

    def test_other_origin_gets_no_cors_headers(self, edge, key):
        response = edge.request(
            "GET",
            "/v1/billing/usage",
            headers=key | {"origin": "https://evil.example"},
        )

        assert 200 == response.status
        assert "access-control-allow-origin" not in response.headers

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/v1/audit/ab%C0"),
            ("GET", "/v1/audit?action=%FF"),
            ("DELETE", "/v1/keys/%00"),
            ("GET", "/v1/audit?pageToken=a%00b"),
        ],
    )
    def test_unusable_url_bytes_get_400(self, edge, key, method, path):
        """Bytes that are not UTF-8, or NUL, are a client error."""
        response = edge.request(method, path, headers=key)

        error = assert_safe_error(
            response.status, response.headers, response.body, 400
        )
        assert "invalid URL" in error["message"]

    def test_grpc_nul_string_rejected(self, edge, key):
        """A native gRPC string with NUL is named, as in JSON."""
        request = cds_pb2.ClinicalReviewRequest(
            question="a\x00b",
            options=cds_pb2.ReviewOptions(model_review=False),
        )
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    request, metadata=list(key.items()), timeout=30
                )

        assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
        assert "question" in raised.value.details()

    def test_dot_segments_match_nothing(self, edge, key):
        """Paths are matched as sent: a dot segment names no method."""
        response = edge.request("GET", "/v1/cds/../billing/usage", headers=key)

        assert_safe_error(
            response.status, response.headers, response.body, 404
        )

    def test_client_request_id_never_echoed(self, edge):
        """Even a request Envoy rejects early gets the edge's own id."""
        for path in ("/v1/%00", "/v1/audit/a%00b", "/v1//audit"):
            response = edge.request(
                "GET", path, headers={"x-request-id": "client-chosen"}
            )

            assert "client-chosen" != response.headers["x-request-id"]
            assert b"client-chosen" not in response.body


class TestApiDescription:
    def test_served_without_key(self, edge):
        """GET /v1/openapi.json needs no key and is the committed file."""
        response = edge.request("GET", "/v1/openapi.json")

        assert 200 == response.status
        assert [] == response_problems(
            "GET", response.status, response.headers, response.body
        )
        assert response.headers["content-type"] == "application/json"
        assert json.loads(API_DESCRIPTION_FILE.read_text()) == response.json()

    def test_post_to_description_rejected(self, edge):
        response = edge.request("POST", "/v1/openapi.json", b"")

        assert 200 != response.status
        assert [] == error_shape_problems(
            response.body, response.headers["x-request-id"]
        )
