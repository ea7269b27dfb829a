"""Authentication, quotas and response headers at the edge."""

import datetime

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "0",
    "cache-control": "no-store",
}


def next_midnight_unix() -> int:
    tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(
        days=1
    )
    midnight = datetime.datetime.combine(
        tomorrow, datetime.time(), tzinfo=datetime.UTC
    )

    return int(midnight.timestamp())


class TestAuthentication:
    def test_missing_key_gets_401_json(self, edge):
        """No key: 401 with a google.rpc.Status body and the request id."""
        response = edge.request("POST", REVIEW_PATH, RULES_ONLY)

        assert 401 == response.status
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()
        assert 16 == error["code"]
        assert "X-API-Key" in error["message"]
        request_ids = [
            detail["requestId"]
            for detail in error["details"]
            if "requestId" in detail
        ]
        assert [response.headers["x-request-id"]] == request_ids
        assert "x-ratelimit-limit" not in response.headers

    def test_unknown_key_gets_401(self, edge):
        """A well-formed but unknown key gets 401."""
        from services.auth.keys import generate_key

        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": generate_key()}
        )

        assert 401 == response.status
        assert "unknown" in response.json()["message"]

    def test_mistyped_key_gets_401(self, edge, new_org):
        """A key with one character changed fails its checksum."""
        org = new_org()
        changed = org.api_key[:-1] + ("A" if org.api_key[-1] != "A" else "B")

        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": changed}
        )

        assert 401 == response.status

    def test_customer_key_cannot_operate(self, edge, new_org):
        """An API key is not an operator credential."""
        org = new_org()

        response = edge.request(
            "GET",
            "/v1/operator/organizations",
            headers={
                "x-api-key": org.api_key,
                "authorization": f"Bearer {org.api_key}",
            },
        )

        assert 401 == response.status

    def test_spoofed_org_header_ignored(self, edge, new_org):
        """A client-sent x-org-id never chooses the organization."""
        mine, other = new_org(), new_org()

        response = edge.request(
            "GET",
            "/v1/billing/subscription",
            headers={"x-api-key": mine.api_key, "x-org-id": other.org_id},
        )

        assert 200 == response.status
        # Each usage read counts itself: one for the other org means the
        # spoofed request was not counted against it.
        theirs = edge.request(
            "GET", "/v1/billing/usage", headers={"x-api-key": other.api_key}
        ).json()
        assert "1" == theirs["totalRequests"]
        ours = edge.request(
            "GET", "/v1/billing/usage", headers={"x-api-key": mine.api_key}
        ).json()
        assert "2" == ours["totalRequests"]


class TestResponseHeaders:
    @pytest.mark.parametrize(
        ("method", "path", "with_key"),
        [
            ("POST", REVIEW_PATH, True),
            ("POST", REVIEW_PATH, False),
            ("GET", "/no/such/route", False),
            ("GET", "/v1/audit", True),
        ],
    )
    def test_security_headers_everywhere(
        self, edge, new_org, method, path, with_key
    ):
        """Every response carries the security headers and a request id."""
        headers = {"x-api-key": new_org().api_key} if with_key else {}
        body = RULES_ONLY if method == "POST" else None

        response = edge.request(method, path, body, headers)

        for name, value in SECURITY_HEADERS.items():
            assert value == response.headers.get(name), name
        assert response.headers["x-request-id"]
        assert "x-envoy-upstream-service-time" not in response.headers
        assert "server" not in response.headers
        assert "grpc-status" not in response.headers
        assert response.headers["content-type"].startswith("application/json")

    def test_client_request_id_replaced(self, edge):
        """A client-sent X-Request-ID is replaced by the edge's own."""
        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-request-id": "chosen-by-me"}
        )

        assert "chosen-by-me" != response.headers["x-request-id"]

    def test_request_ids_unique(self, edge):
        """Two requests get two different request ids."""
        first = edge.request("POST", REVIEW_PATH, RULES_ONLY)
        second = edge.request("POST", REVIEW_PATH, RULES_ONLY)

        assert first.headers["x-request-id"] != second.headers["x-request-id"]

    def test_oversized_body_gets_413_json(self, edge, new_org):
        """A body over 64 KiB gets 413 in JSON."""
        body = {"question": "x" * (65 * 1024)}

        response = edge.request(
            "POST", REVIEW_PATH, body, {"x-api-key": new_org().api_key}
        )

        assert 413 == response.status
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["code"]


class TestDailyQuota:
    def test_free_plan_101st_request_gets_429(self, edge, new_org):
        """A Free org's 101st request of the UTC day gets 429."""
        org = new_org()
        headers = {"x-api-key": org.api_key}
        reset = str(next_midnight_unix())

        for sent in range(1, 101):
            response = edge.request("POST", REVIEW_PATH, RULES_ONLY, headers)
            assert 200 == response.status, response.body
            assert "100" == response.headers["x-ratelimit-limit"]
            assert str(100 - sent) == response.headers["x-ratelimit-remaining"]
            assert reset == response.headers["x-ratelimit-reset"]
        rejected = edge.request("POST", REVIEW_PATH, RULES_ONLY, headers)

        assert 429 == rejected.status
        assert 8 == rejected.json()["code"]
        assert "0" == rejected.headers["x-ratelimit-remaining"]
        retry_after = int(rejected.headers["retry-after"])
        assert 0 < retry_after <= 86400 + 1
        # Every authenticated request shares the quota, reads included.
        usage = edge.request("GET", "/v1/billing/usage", headers=headers)
        assert 429 == usage.status

    def test_failed_request_still_counts(self, edge, new_org):
        """A request the service rejects still counts toward the quota."""
        org = new_org()
        headers = {"x-api-key": org.api_key}

        bad = edge.request(
            "POST", REVIEW_PATH, {"question": "x" * 2001}, headers
        )
        good = edge.request("POST", REVIEW_PATH, RULES_ONLY, headers)

        assert 400 == bad.status
        assert "99" == bad.headers["x-ratelimit-remaining"]
        assert "98" == good.headers["x-ratelimit-remaining"]

    def test_over_quota_wins_over_request_errors(self, edge, new_org):
        """At the limit, a bad body or a missing scope also gets 429."""
        org = new_org()
        headers = {"x-api-key": org.api_key}
        review_only = edge.request(
            "POST", "/v1/keys", {"scopes": ["CLINICAL_REVIEW"]}, headers
        ).json()["apiKey"]
        for _ in range(99):
            edge.request("POST", REVIEW_PATH, RULES_ONLY, headers)

        bad_body = edge.request(
            "POST", REVIEW_PATH, {"medicationz": []}, headers
        )
        no_scope = edge.request(
            "GET", "/v1/audit", None, {"x-api-key": review_only}
        )

        assert 429 == bad_body.status
        assert 429 == no_scope.status

    def test_enterprise_is_unlimited(self, edge, new_org):
        """Enterprise responses say the limit is unlimited."""
        org = new_org("enterprise")

        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": org.api_key}
        )

        assert 200 == response.status
        assert "unlimited" == response.headers["x-ratelimit-limit"]

    def test_grpc_over_quota_resource_exhausted(self, edge, new_org):
        """Over the quota a gRPC caller gets RESOURCE_EXHAUSTED."""
        org = new_org()
        headers = {"x-api-key": org.api_key}
        for _ in range(100):
            edge.request("POST", REVIEW_PATH, RULES_ONLY, headers)

        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    cds_pb2.ClinicalReviewRequest(),
                    metadata=[("x-api-key", org.api_key)],
                    timeout=30,
                )

        assert grpc.StatusCode.RESOURCE_EXHAUSTED == raised.value.code()


class TestTransport:
    def test_tls_12_refused(self, edge):
        """A client limited to TLS 1.2 cannot connect."""
        import socket
        import ssl

        context = ssl.create_default_context(cafile=str(edge.ca_file))
        context.maximum_version = ssl.TLSVersion.TLSv1_2

        with socket.create_connection(("127.0.0.1", edge.port), 10) as raw:
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="localhost")


class TestServicePeers:
    def _channel(self, stack, client: str, service: str) -> grpc.Channel:
        certs = stack.certs_dir
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.crt").read_bytes(),
            private_key=(certs / f"{client}.key").read_bytes(),
            certificate_chain=(certs / f"{client}.crt").read_bytes(),
        )

        return grpc.secure_channel(
            f"127.0.0.1:{stack.ports[service]}", credentials
        )

    def test_account_api_only_for_billing(self, stack, new_org):
        """The internal account API accepts billing's certificate only."""
        from arxio.internal.v1 import accounts_pb2, accounts_pb2_grpc

        org = new_org()
        request = accounts_pb2.GetOrganizationRequest(org_id=org.org_id)

        with self._channel(stack, "billing", "auth") as channel:
            stub = accounts_pb2_grpc.AccountServiceStub(channel)
            assert (
                org.org_id == stub.GetOrganization(request, timeout=5).org_id
            )
        for client in ("cds", "envoy"):
            with self._channel(stack, client, "auth") as channel:
                stub = accounts_pb2_grpc.AccountServiceStub(channel)
                with pytest.raises(grpc.RpcError) as raised:
                    stub.GetOrganization(request, timeout=5)
            assert grpc.StatusCode.PERMISSION_DENIED == raised.value.code()

    def test_services_reject_other_services(self, stack):
        """The CDS service accepts calls from the edge's certificate only."""
        with self._channel(stack, "audit", "cds") as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(cds_pb2.ClinicalReviewRequest(), timeout=5)

        assert grpc.StatusCode.PERMISSION_DENIED == raised.value.code()

    def test_services_require_client_certificate(self, stack):
        """A TLS client without a certificate cannot reach a service."""
        credentials = grpc.ssl_channel_credentials(
            (stack.certs_dir / "ca.crt").read_bytes()
        )
        address = f"127.0.0.1:{stack.ports['cds']}"

        with grpc.secure_channel(address, credentials) as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(cds_pb2.ClinicalReviewRequest(), timeout=5)

        assert grpc.StatusCode.UNAVAILABLE == raised.value.code()
