"""CORS: only configured origins, and Envoy alone handles preflights.

The suite's own edge has no origins configured, so these tests start a
second Envoy with ARXIO_CORS_ORIGINS' equivalent, in front of the same
services. Envoy's ext_authz counters prove that no preflight reached the
auth decision.
"""

import pytest

from tests.e2e.edge_instance import EdgeInstance
from tests.edge import EdgeClient
from tests.fuzz.checks import SECURITY_HEADERS, response_problems

pytestmark = pytest.mark.e2e

ALLOWED = "https://app.example"
OTHER = "https://evil.example"
REVIEW_PATH = "/v1/cds/clinical-review"


@pytest.fixture(scope="module")
def cors_edge(stack, tmp_path_factory):
    instance = EdgeInstance(
        stack, tmp_path_factory.mktemp("cors"), cors_origins=(ALLOWED,)
    ).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def client(stack, cors_edge) -> EdgeClient:
    return EdgeClient(cors_edge.port, stack.certs_dir / "ca.crt")


def auth_checks(instance: EdgeInstance) -> int:
    """Return how many requests this Envoy sent to the auth decision."""
    counters = instance.stats("http.edge.ext_authz.")

    return sum(
        counters.get(f"http.edge.ext_authz.{outcome}", 0)
        for outcome in ("ok", "denied", "error", "failure_mode_allowed")
    )


def preflight(client: EdgeClient, origin: str):
    return client.request(
        "OPTIONS",
        REVIEW_PATH,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-api-key",
        },
    )


class TestPreflight:
    def test_allowed_origin_handled_by_envoy(self, client, cors_edge):
        before = auth_checks(cors_edge)

        response = preflight(client, ALLOWED)

        assert 200 == response.status
        assert ALLOWED == response.headers["access-control-allow-origin"]
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "x-api-key" in response.headers["access-control-allow-headers"]
        assert "600" == response.headers["access-control-max-age"]
        for name, value in SECURITY_HEADERS.items():
            assert value == response.headers.get(name), name
        assert response.headers["x-request-id"]
        assert before == auth_checks(cors_edge)

    def test_other_origin_gets_no_cors_headers(self, client, cors_edge):
        before = auth_checks(cors_edge)

        response = preflight(client, OTHER)

        assert 404 == response.status
        assert [] == [
            name
            for name in response.headers
            if name.startswith("access-control-")
        ]
        assert [] == response_problems(
            "OPTIONS", response.status, response.headers, response.body
        )
        assert before == auth_checks(cors_edge)


class TestActualRequests:
    def test_allowed_origin_can_read_errors(self, client):
        """A 401 to an allowed origin carries CORS headers."""
        response = client.request(
            "GET", "/v1/billing/usage", headers={"origin": ALLOWED}
        )

        assert 401 == response.status
        assert ALLOWED == response.headers["access-control-allow-origin"]
        exposed = response.headers["access-control-expose-headers"]
        assert "x-request-id" in exposed

    def test_other_origin_gets_no_cors_headers(self, client, new_org):
        response = client.request(
            "GET",
            "/v1/billing/usage",
            headers={"origin": OTHER, "x-api-key": new_org().api_key},
        )

        assert 200 == response.status
        assert "access-control-allow-origin" not in response.headers

    @pytest.mark.parametrize(
        ("method", "path", "body", "headers", "status"),
        [
            (
                "POST",
                REVIEW_PATH,
                b"{" + b" " * 70_000 + b"}",
                {"content-type": "application/json"},
                413,
            ),
            ("POST", REVIEW_PATH, b"{}", {"content-type": "text/plain"}, 415),
            ("GET", "/no/such/path", None, {}, 404),
            ("GET", "/v1/audit?pageSize=1&pageSize=2", None, {}, 400),
        ],
    )
    def test_edge_replies_readable_by_allowed_origin(
        self, client, new_org, method, path, body, headers, status
    ):
        """Envoy's own replies carry CORS headers too, so a browser script
        can read why its request failed. With a key, because the auth
        decision rejects a body over the limit only after the key check."""
        key = {"x-api-key": new_org().api_key}
        response = client.request(
            method, path, body, headers | key | {"origin": ALLOWED}
        )

        assert status == response.status
        assert ALLOWED == response.headers["access-control-allow-origin"]
        assert (
            "x-request-id" in response.headers["access-control-expose-headers"]
        )
        assert "origin" == response.headers["vary"]

    def test_edge_replies_to_other_origin_bare(self, client):
        response = client.request(
            "POST",
            REVIEW_PATH,
            b"{}",
            {"content-type": "text/plain", "origin": OTHER},
        )

        assert 415 == response.status
        assert "access-control-allow-origin" not in response.headers

    @pytest.mark.parametrize("origin", [None, ALLOWED, OTHER])
    def test_every_response_varies_by_origin(self, client, new_org, origin):
        """Caches must not serve one origin's reply to another."""
        headers = {"x-api-key": new_org().api_key}
        if origin is not None:
            headers["origin"] = origin

        response = client.request("GET", "/v1/billing/usage", headers=headers)

        assert 200 == response.status
        assert "origin" == response.headers["vary"]
