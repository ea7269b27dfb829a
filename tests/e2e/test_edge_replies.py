"""The edge's own replies: every one safe, JSON and traceable.

Envoy replies to some requests itself (431, 426, 415, 404, the API
description) before any service sees them. Each reply must carry the
security headers, an X-Request-ID and, for errors, the google.rpc.Status
JSON shape with that request id in its details.
"""

import gzip
import http.client
import json
import socket
import ssl
import urllib.parse

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from services.launcher.edge_guards import API_DESCRIPTION_FILE
from tests.e2e.edge_instance import EdgeInstance
from tests.edge import EdgeClient
from tests.fuzz.checks import error_shape_problems, response_problems
from tests.suite import Organization

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
GRPC_REVIEW_PATH = (
    "/arxio.cds.v1.ClinicalDecisionSupportService/ClinicalReview"
)
# A value no reply may repeat: it stands for patient data in a request.
MARKER = "zzphimarker"
RULES_ONLY = {
    "medications": [{"name": "warfarin"}],
    "options": {"modelReview": False},
}


@pytest.fixture(scope="module")
def key(stack) -> dict:
    return {"x-api-key": Organization(stack, "enterprise").api_key}


def raw_exchange(
    edge, request: bytes, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw HTTP/1.x bytes over TLS and parse the reply, waiting at most
    `timeout` seconds for each read."""
    context = ssl.create_default_context(cafile=str(edge.ca_file))
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", edge.port), timeout) as raw:
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

        # What gRPC reports of a message over a receiver's limit.
        assert grpc.StatusCode.RESOURCE_EXHAUSTED == raised.value.code()
        assert raised.value.details().startswith("request body too large")

    @pytest.mark.parametrize(
        "path",
        ["/no.such.Service/Method", "/arxio.cds.v1.NoSuchService/Method"],
    )
    def test_unknown_grpc_service_is_unimplemented(self, edge, key, path):
        """A gRPC path no route matches gets a plain message, not JSON."""
        with edge.channel() as channel:
            call = channel.unary_unary(
                path,
                request_serializer=lambda raw: raw,
                response_deserializer=lambda raw: raw,
            )
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", metadata=list(key.items()), timeout=30)

        assert grpc.StatusCode.UNIMPLEMENTED == raised.value.code()
        assert raised.value.details().startswith("unknown gRPC service")
        metadata = dict(raised.value.trailing_metadata())
        assert metadata["x-request-id"]

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

    @pytest.mark.parametrize(
        ("method", "path"),
        [("GET", "/v1/audit/"), ("GET", "/v1/keys/"), ("POST", "/v1/keys/")],
    )
    def test_path_without_method_has_message(self, edge, key, method, path):
        """A 404 with no text from Envoy still gets a message."""
        response = edge.request(method, path, headers=key)

        error = assert_safe_error(
            response.status, response.headers, response.body, 404
        )
        assert error["message"].startswith("no API method at this path")

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


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """Return the BadRequest field violations of a gRPC error."""
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Unpack(bad_request):
            break

    return {
        violation.field: violation.description
        for violation in bad_request.field_violations
    }


def raw_review_call(edge, key, message: bytes, compression) -> grpc.RpcError:
    """Call ClinicalReview with a serialized message; return its error."""
    with edge.channel() as channel:
        call = channel.unary_unary(
            GRPC_REVIEW_PATH,
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as raised:
            call(
                message,
                metadata=list(key.items()),
                timeout=30,
                compression=compression,
            )

    return raised.value


def grpc_over_http1(edge, key, frame: bytes, **headers: str):
    """Send one framed gRPC body over HTTP/1.1, which Envoy accepts too.

    A gRPC library never sets the compressed flag without a known
    encoding, so this is how a client that does reaches the edge.
    """
    return edge.request(
        "POST",
        GRPC_REVIEW_PATH,
        frame,
        key | {"content-type": "application/grpc", "te": "trailers"} | headers,
    )


def frame(payload: bytes, compressed: bool) -> bytes:
    flag = b"\x01" if compressed else b"\x00"

    return flag + len(payload).to_bytes(4, "big") + payload


class TestCompressedGrpc:
    def test_gzip_message_is_checked(self, edge, key):
        """A gzip message with an unknown field is named, as a plain one."""
        message = cds_pb2.ClinicalReviewRequest(
            options=cds_pb2.ReviewOptions(model_review=False)
        ).SerializeToString()
        # Field 99, varint 1: unknown to ClinicalReviewRequest.
        message += bytes([0x98, 0x06, 0x01])

        error = raw_review_call(edge, key, message, grpc.Compression.Gzip)

        assert grpc.StatusCode.INVALID_ARGUMENT == error.code()
        assert "#99" in field_violations(error)

    @pytest.mark.parametrize(
        "compression", [grpc.Compression.Gzip, grpc.Compression.Deflate]
    )
    def test_message_over_64_kib_decompressed(self, edge, key, compression):
        """4 MB of text compresses to a few KiB and is still too large."""
        message = cds_pb2.ClinicalReviewRequest(
            question="x" * 4_000_000
        ).SerializeToString()

        error = raw_review_call(edge, key, message, compression)

        assert grpc.StatusCode.RESOURCE_EXHAUSTED == error.code()
        assert "64 KiB" in error.details()

    def test_valid_gzip_message_reviewed(self, edge, key):
        request = cds_pb2.ClinicalReviewRequest(
            medications=[cds_pb2.Medication(name="warfarin")],
            options=cds_pb2.ReviewOptions(model_review=False),
        )
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            response = stub.ClinicalReview(
                request,
                metadata=list(key.items()),
                timeout=30,
                compression=grpc.Compression.Gzip,
            )

        assert response.knowledge_base_version

    @pytest.mark.parametrize("encoding", [None, "identity"])
    def test_compressed_flag_without_encoding(self, edge, key, encoding):
        """A compressed flag the encoding cannot explain is the client's
        error, never INTERNAL."""
        message = cds_pb2.ClinicalReviewRequest().SerializeToString()
        headers = {} if encoding is None else {"grpc-encoding": encoding}

        response = grpc_over_http1(
            edge, key, frame(gzip.compress(message), True), **headers
        )

        assert "3" == response.headers["grpc-status"]
        message = urllib.parse.unquote(response.headers["grpc-message"])
        assert "body" in message

    @pytest.mark.parametrize("encoding", ["snappy", "GZIP", "br"])
    def test_unknown_encoding_unimplemented(self, edge, key, encoding):
        """As the gRPC spec asks: UNIMPLEMENTED, with the encodings the
        server accepts."""
        message = cds_pb2.ClinicalReviewRequest().SerializeToString()

        response = grpc_over_http1(
            edge, key, frame(message, False), **{"grpc-encoding": encoding}
        )

        assert "12" == response.headers["grpc-status"]
        accepted = response.headers["grpc-accept-encoding"]
        assert {"identity", "deflate", "gzip"} == set(accepted.split(","))

    def test_unknown_encoding_spoils_no_later_call(self, edge, key):
        """A call in an unknown encoding once made the service fail the
        later calls on its connection with INTERNAL."""
        message = cds_pb2.ClinicalReviewRequest(
            options=cds_pb2.ReviewOptions(model_review=False)
        ).SerializeToString()
        # One connection each, so every Envoy worker's upstream connection
        # is likely to carry one.
        for _ in range(4):
            grpc_over_http1(
                edge, key, frame(message, False), **{"grpc-encoding": "snappy"}
            )

        error = None
        try:
            with edge.channel() as channel:
                call = channel.unary_unary(
                    GRPC_REVIEW_PATH,
                    request_serializer=lambda raw: raw,
                    response_deserializer=lambda raw: raw,
                )
                call(
                    message,
                    metadata=list(key.items()),
                    timeout=30,
                    compression=grpc.Compression.Gzip,
                )
        except grpc.RpcError as raised:
            error = raised

        assert error is None, error

    @pytest.mark.parametrize(
        "header",
        [
            {"grpc-timeout": "zz"},
            {"grpc-encoding": "snappy"},
            {"grpc-status": "x"},
            {"x-trace-bin": "!!!"},
        ],
    )
    def test_grpc_metadata_on_rest_ignored(self, edge, key, header):
        """A REST request's gRPC headers are dropped; invalid ones made the
        service fail with 500."""
        response = edge.request("POST", REVIEW_PATH, RULES_ONLY, key | header)

        assert 200 == response.status, response.body

    def test_services_limit_decompressed_messages(self, stack):
        """A service itself rejects a message past its limit, compressed or
        not, even from the edge's own certificate."""
        certs = stack.certs_dir
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.crt").read_bytes(),
            private_key=(certs / "envoy.key").read_bytes(),
            certificate_chain=(certs / "envoy.crt").read_bytes(),
        )
        request = cds_pb2.ClinicalReviewRequest(question="x" * 4_000_000)
        address = f"127.0.0.1:{stack.ports['cds']}"

        with grpc.secure_channel(address, credentials) as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    request, timeout=30, compression=grpc.Compression.Gzip
                )

        assert grpc.StatusCode.RESOURCE_EXHAUSTED == raised.value.code()


class TestLargeHeaders:
    @pytest.mark.parametrize("size", [9_000, 17_000, 30_000])
    def test_rest_request_reaches_service(self, edge, key, size):
        """Headers the edge admits are within every service's limit."""
        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, key | {"x-filler": "a" * size}
        )

        assert 200 == response.status, response.body

    def test_grpc_metadata_reaches_service(self, edge, key):
        metadata = [*key.items(), ("x-filler", "a" * 30_000)]
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            response = stub.ClinicalReview(
                cds_pb2.ClinicalReviewRequest(
                    options=cds_pb2.ReviewOptions(model_review=False)
                ),
                metadata=metadata,
                timeout=30,
            )

        assert response.knowledge_base_version

    @pytest.mark.parametrize("filler", range(32_300, 32_700, 50))
    def test_headers_near_limit_get_431(self, edge, key, filler):
        """Headers that pass the codec's 32 KiB check but not once the edge
        and the auth decision add theirs get 431, not an empty 500.

        About 200 bytes of other headers come with the filler, and about
        400 are added, so some of these sizes fall between the two checks.
        """
        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, key | {"x-filler": "a" * filler}
        )

        error = assert_safe_error(
            response.status, response.headers, response.body, 431
        )
        assert "32 KiB" in error["message"]

    def test_long_content_type_copied_in_part(self, edge, key):
        """The edge's copy of a 20 KB content type does not double it."""
        content_type = "application/json; x=" + "a" * 20_000

        response = edge.request(
            "GET",
            "/v1/billing/usage",
            headers=key | {"content-type": content_type},
        )

        assert 200 == response.status, response.body


class TestProtocolErrors:
    def test_transfer_encoding_gzip_gets_400(self, edge):
        request = (
            f"POST {REVIEW_PATH} HTTP/1.1\r\nhost: localhost\r\n"
            "transfer-encoding: gzip, chunked\r\n"
            "content-type: application/json\r\nconnection: close\r\n\r\n"
            "0\r\n\r\n"
        ).encode()

        status, headers, body = raw_exchange(edge, request)

        error = assert_safe_error(status, headers, body, 400)
        assert "Transfer-Encoding" in error["message"]

    def test_http_20_request_line_not_called_10(self, edge):
        """Envoy treats HTTP/2.0 in an HTTP/1 request line as HTTP/1.0."""
        request = b"GET /v1/billing/usage HTTP/2.0\r\nhost: localhost\r\n\r\n"

        status, headers, body = raw_exchange(edge, request)

        error = assert_safe_error(status, headers, body, 426)
        assert "HTTP/1.0" not in error["message"]
        assert "HTTP version" in error["message"]

    def test_unreachable_service_gets_plain_503(self, stack, tmp_path, key):
        """Envoy's own text (no healthy upstream, reset reasons) stays in."""

        def unreachable_cds(config: dict) -> None:
            for cluster in config["static_resources"]["clusters"]:
                if cluster["name"] == "cds":
                    endpoint = cluster["load_assignment"]["endpoints"][0]
                    address = endpoint["lb_endpoints"][0]["endpoint"]
                    address["address"]["socket_address"]["port_value"] = 9

        instance = EdgeInstance(
            stack, tmp_path, change_config=unreachable_cds
        ).start()
        try:
            client = EdgeClient(instance.port, stack.certs_dir / "ca.crt")
            response = client.request("POST", REVIEW_PATH, RULES_ONLY, key)
        finally:
            instance.stop()

        assert 503 == response.status
        assert "x-request-id" in response.headers
        error = response.json()
        assert "the service is unavailable: retry shortly" == error["message"]


class TestQuotedValues:
    @pytest.mark.parametrize(
        "path",
        [
            f"/v1/audit?pageSize={MARKER}",
            f"/v1/keys?pageSize=1{MARKER}",
            f"/v1/audit?startTime={MARKER}",
        ],
    )
    def test_bad_query_value_never_echoed(self, edge, key, path):
        response = edge.request("GET", path, headers=key)

        error = assert_safe_error(
            response.status, response.headers, response.body, 400
        )
        assert MARKER not in response.body.decode()
        assert "/v1/openapi.json" in error["message"]

    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            (f"garbage {MARKER}".encode(), "text/plain"),
            (json.dumps({MARKER: 1}).encode(), "application/json"),
            (json.dumps({"pageSize": 5}).encode(), "application/json"),
        ],
    )
    def test_body_on_get_rejected(self, edge, key, body, content_type):
        """A GET takes no body: not even known fields slip in through one."""
        response = edge.request(
            "GET", "/v1/audit", body, key | {"content-type": content_type}
        )

        error = assert_safe_error(
            response.status, response.headers, response.body, 400
        )
        assert "no request body" in error["message"]
        assert MARKER not in response.body.decode()

    @pytest.mark.parametrize(
        "query",
        [
            "pageSize=1&pageSize=2",
            "pageSize=1&page_size=2",
            "action=a&pageSize=1&action=b",
            "pageToken&pageToken=x",
        ],
    )
    def test_repeated_query_parameter_rejected(self, edge, key, query):
        response = edge.request("GET", f"/v1/audit?{query}", headers=key)

        error = assert_safe_error(
            response.status, response.headers, response.body, 400
        )
        assert "more than once" in error["message"]

    def test_distinct_query_parameters_accepted(self, edge, key):
        response = edge.request(
            "GET", "/v1/audit?pageSize=1&page_token=&action=x", headers=key
        )

        assert 200 == response.status, response.body


class TestMetricsPort:
    def test_no_server_header(self, stack):
        port = stack.metrics_ports["envoy"]
        for path in ("/metrics", "/elsewhere"):
            connection = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=10
            )
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()

            assert response.getheader("server") is None, path
            assert response.getheader("x-envoy-upstream-service-time") is None
