"""CDS Hooks through the real edge: discovery, hooks, 412, feedback, JWTs.

A local JWK Set server on 127.0.0.1, serving https with a certificate of
the suite's own CA, plays the EHR.
"""

import http.server
import json
import ssl
import tempfile
import threading
import time
import uuid
from pathlib import Path

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from services.common import certs
from tests.cds.hooks.helpers import (
    PATIENT_IDENTIFIERS,
    card_problems,
    hook_request,
)
from tests.e2e.test_audit import stored_rows
from tests.suite import cli_process, run_cli

pytestmark = pytest.mark.e2e

SIGN_PATH = "/cds-services/arxio-order-sign"


class JwksServer:
    """An EHR's JWK Set over https on a free loopback port."""

    def __init__(self, certs_dir: Path) -> None:
        self.private_key = ec.generate_private_key(ec.SECP384R1())
        public = json.loads(
            jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key())
        )
        self.document = {
            "keys": [{**public, "kid": "ehr-1", "alg": "ES384", "use": "sig"}]
        }
        self.fetches = 0
        self._folder = tempfile.TemporaryDirectory()
        folder = Path(self._folder.name)
        certs._issue(folder, "ehr-jwks", *certs._load_ca(certs_dir))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(
            folder / "ehr-jwks.crt", folder / "ehr-jwks.key"
        )
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/redirect":
                    # Another host: the fetcher must not follow it.
                    self.send_response(302)
                    self.send_header(
                        "location", f"https://localhost:{server.port}/jwks"
                    )
                    self.end_headers()
                    return
                server.fetches += 1
                body = json.dumps(server.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *arguments) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(
            self.httpd.socket, server_side=True
        )
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/jwks") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._folder.cleanup()


@pytest.fixture(scope="module")
def jwks_server(stack):
    server = JwksServer(stack.certs_dir)
    yield server
    server.stop()


@pytest.fixture
def ehr(stack, new_org, jwks_server):
    """An organization with a registered EHR issuer."""
    org = new_org("pro")
    org.issuer = f"https://ehr.example.org/{uuid.uuid4()}"
    registered = run_cli(
        stack,
        "ehr",
        "register",
        "--org",
        org.org_id,
        "--issuer",
        org.issuer,
        "--jwks-url",
        jwks_server.url(),
    )
    org.issuer_id = registered["issuerId"]

    return org


def _token(stack, jwks_server, issuer, path=SIGN_PATH, **claims) -> str:
    now = int(time.time())
    payload = {
        "iss": issuer,
        "aud": f"https://localhost:{stack.edge_port}{path}",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        **claims,
    }

    return jwt.encode(
        payload,
        jwks_server.private_key,
        algorithm="ES384",
        headers={"kid": "ehr-1", "typ": "JWT"},
    )


def _bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def _call(edge, hook: str, headers: dict, document=None):
    path = f"/cds-services/arxio-{hook}"

    return edge.request("POST", path, document or hook_request(hook), headers)


class TestDiscovery:
    def test_lists_three_services(self, edge, new_org):
        """GET /cds-services lists the three services with prefetch."""
        org = new_org()

        response = edge.request(
            "GET", "/cds-services", None, {"x-api-key": org.api_key}
        )

        assert 200 == response.status, response.body
        assert response.headers["content-type"].startswith("application/json")
        services = response.json()["services"]
        assert {
            "arxio-order-select",
            "arxio-order-sign",
            "arxio-patient-view",
        } == {service["id"] for service in services}
        assert "x-ratelimit-limit" in response.headers

    def test_needs_a_credential(self, edge):
        """Without a key or JWT discovery is 401."""
        response = edge.request("GET", "/cds-services")

        assert 401 == response.status


class TestHooks:
    @pytest.mark.parametrize("hook", ["order-sign", "order-select"])
    def test_order_hooks_return_cards(self, edge, new_org, hook):
        """The warfarin-aspirin interaction is a critical card."""
        org = new_org()

        response = _call(edge, hook, {"x-api-key": org.api_key})

        assert 200 == response.status, response.body
        document = response.json()
        assert [] == card_problems(document)
        interaction = [
            card
            for card in document["cards"]
            if card["source"]["topic"]["code"].startswith("ddi.")
        ]
        assert 1 == len(interaction)
        assert "critical" == interaction[0]["indicator"]
        action = interaction[0]["suggestions"][0]["actions"][0]
        assert "MedicationRequest/draft-aspirin" == action["resourceId"]

    def test_patient_view_returns_cards(self, edge, new_org):
        """patient-view screens the chart's active medications."""
        org = new_org()

        response = _call(edge, "patient-view", {"x-api-key": org.api_key})

        assert 200 == response.status, response.body
        assert [] == card_problems(response.json())
        assert response.json()["cards"]

    @pytest.mark.parametrize("hook", ["order-sign", "patient-view"])
    def test_no_identifier_echoed(self, edge, new_org, hook):
        """Names, MRNs and FHIR ids of the patient never come back."""
        org = new_org()

        response = _call(edge, hook, {"x-api-key": org.api_key})

        for identifier in PATIENT_IDENTIFIERS:
            assert identifier.encode() not in response.body

    def test_missing_prefetch_is_412(self, edge, new_org):
        """A required prefetch key left out gets 412, not a review."""
        org = new_org()
        document = hook_request("order-sign")
        del document["prefetch"]["allergies"]

        response = _call(
            edge, "order-sign", {"x-api-key": org.api_key}, document
        )

        assert 412 == response.status, response.body
        assert "allergies" in response.json()["message"]
        assert "grpc-status" not in response.headers

    def test_invalid_fhir_is_400_with_path(self, edge, new_org):
        """An invalid resource is rejected, naming its element."""
        org = new_org()
        document = hook_request("order-sign")
        document["prefetch"]["patient"]["gender"] = "F"

        response = _call(
            edge, "order-sign", {"x-api-key": org.api_key}, document
        )

        assert 400 == response.status, response.body
        assert b"prefetch.patient.gender" in response.body
        assert b"example-patient-1" not in response.body

    def test_unknown_service_is_404(self, edge, new_org):
        """A service id that discovery does not list is 404."""
        org = new_org()

        response = edge.request(
            "POST",
            "/cds-services/no-such-service",
            hook_request("order-sign"),
            {"x-api-key": org.api_key},
        )

        assert 404 == response.status

    def test_body_above_64_kib_accepted(self, edge, new_org):
        """Hook routes take bodies up to their own 512 KiB limit."""
        org = new_org()
        document = hook_request("order-sign")
        document["prefetch"]["patient"]["text"] = {
            "status": "generated",
            "div": "<div>" + "x" * 200_000 + "</div>",
        }

        response = _call(
            edge, "order-sign", {"x-api-key": org.api_key}, document
        )

        assert 200 == response.status, response.body[:500]

    def test_body_above_512_kib_is_413(self, edge, new_org):
        """Beyond 512 KiB the edge returns 413."""
        org = new_org()
        document = hook_request("order-sign")
        document["prefetch"]["patient"]["text"] = {
            "status": "generated",
            "div": "<div>" + "x" * 600_000 + "</div>",
        }

        response = _call(
            edge, "order-sign", {"x-api-key": org.api_key}, document
        )

        assert 413 == response.status

    def test_key_without_clinical_scope_is_403(self, stack, edge, new_org):
        """The hooks need the CLINICAL_REVIEW scope."""
        org = new_org()
        key = run_cli(
            stack,
            "keys",
            "create",
            "--org",
            org.org_id,
            "--scope",
            "audit_read",
        )

        response = _call(edge, "order-sign", {"x-api-key": key["apiKey"]})

        assert 403 == response.status


class TestFeedback:
    def test_override_recorded_without_comment(self, stack, edge, new_org):
        """Feedback is stored with its rule and reason, never the comment."""
        org = new_org()
        key = {"x-api-key": org.api_key}
        cards = _call(edge, "order-sign", key).json()["cards"]
        card = next(c for c in cards if "overrideReasons" in c)
        reason = card["overrideReasons"][0]

        response = edge.request(
            "POST",
            SIGN_PATH + "/feedback",
            {
                "feedback": [
                    {
                        "card": card["uuid"],
                        "outcome": "overridden",
                        "overrideReason": {
                            "reason": {
                                "system": reason["system"],
                                "code": reason["code"],
                            },
                            "userComment": "Made Up Example agreed",
                        },
                        "outcomeTimestamp": "2026-11-02T09:15:00Z",
                    }
                ]
            },
            key,
        )

        assert 200 == response.status, response.body
        with psycopg.connect(stack.admin_database_url) as connection:
            rows = connection.execute(
                "SELECT org_id::text, service_id, rule_id, outcome,"
                " override_code, request_id FROM cds.hook_feedback"
                " WHERE card_uuid = %s",
                (card["uuid"],),
            ).fetchall()
            text = str(
                connection.execute(
                    "SELECT * FROM cds.hook_feedback WHERE card_uuid = %s",
                    (card["uuid"],),
                ).fetchall()
            )
        assert 1 == len(rows)
        org_id, service_id, rule_id, outcome, code, request_id = rows[0]
        assert org.org_id == org_id
        assert "arxio-order-sign" == service_id
        assert card["source"]["topic"]["code"] == rule_id
        assert "overridden" == outcome
        assert reason["code"] == code
        assert "Made Up" not in text
        audit = stored_rows(stack, [request_id])
        assert "cds.record_hook_feedback" == audit[request_id][3]

    def test_invalid_feedback_is_400(self, edge, new_org):
        """An unknown outcome is rejected."""
        org = new_org()

        response = edge.request(
            "POST",
            SIGN_PATH + "/feedback",
            {"feedback": [{"card": "x", "outcome": "liked"}]},
            {"x-api-key": org.api_key},
        )

        assert 400 == response.status


class TestJwtAuthentication:
    def test_valid_jwt_authenticates(self, stack, edge, ehr, jwks_server):
        """A signed JWT from the registered EHR works like the org's key."""
        token = _token(stack, jwks_server, ehr.issuer)

        response = _call(edge, "order-sign", _bearer(token))

        assert 200 == response.status, response.body
        assert [] == card_problems(response.json())
        assert "x-ratelimit-remaining" in response.headers

    def test_discovery_with_jwt(self, stack, edge, ehr, jwks_server):
        """Discovery accepts a JWT whose aud is the discovery URL."""
        token = _token(stack, jwks_server, ehr.issuer, path="/cds-services")

        response = edge.request("GET", "/cds-services", None, _bearer(token))

        assert 200 == response.status, response.body

    def test_wrong_audience_is_401(self, stack, edge, ehr, jwks_server):
        """A token for another service is rejected."""
        token = _token(
            stack,
            jwks_server,
            ehr.issuer,
            path="/cds-services/arxio-patient-view",
        )

        response = _call(edge, "order-sign", _bearer(token))

        assert 401 == response.status
        assert "aud" in response.json()["message"]

    def test_expired_is_401(self, stack, edge, ehr, jwks_server):
        """An expired token is rejected."""
        now = int(time.time())
        token = _token(
            stack, jwks_server, ehr.issuer, iat=now - 900, exp=now - 300
        )

        response = _call(edge, "order-sign", _bearer(token))

        assert 401 == response.status
        assert "expired" in response.json()["message"]

    def test_replayed_jti_is_401(self, stack, edge, ehr, jwks_server):
        """The same token a second time is a replay."""
        token = _token(stack, jwks_server, ehr.issuer)
        first = _call(edge, "order-sign", _bearer(token))

        second = _call(edge, "order-sign", _bearer(token))

        assert 200 == first.status, first.body
        assert 401 == second.status
        assert "jti" in second.json()["message"]

    def test_unknown_issuer_is_401(self, stack, edge, jwks_server):
        """A token from an unregistered issuer is rejected."""
        token = _token(stack, jwks_server, "https://unknown-ehr.example.org")

        response = _call(edge, "order-sign", _bearer(token))

        assert 401 == response.status
        assert "not registered" in response.json()["message"]

    def test_jwt_not_accepted_elsewhere(self, stack, edge, ehr, jwks_server):
        """A CDS Hooks JWT is no credential for the review API."""
        token = _token(
            stack, jwks_server, ehr.issuer, path="/v1/cds/clinical-review"
        )

        response = edge.request(
            "POST",
            "/v1/cds/clinical-review",
            {"medications": [{"name": "aspirin"}]},
            _bearer(token),
        )

        assert 401 == response.status

    def test_deleted_issuer_is_401(self, stack, edge, ehr, jwks_server):
        """After deletion the issuer's tokens stop working."""
        run_cli(
            stack,
            "ehr",
            "delete",
            "--org",
            ehr.org_id,
            "--issuer-id",
            ehr.issuer_id,
        )
        token = _token(stack, jwks_server, ehr.issuer)

        response = _call(edge, "order-sign", _bearer(token))

        assert 401 == response.status

    def test_redirect_to_other_host_not_followed(
        self, stack, edge, new_org, jwks_server
    ):
        """A JWK Set URL that redirects elsewhere yields no keys."""
        org = new_org()
        issuer = f"https://ehr.example.org/{uuid.uuid4()}"
        run_cli(
            stack,
            "ehr",
            "register",
            "--org",
            org.org_id,
            "--issuer",
            issuer,
            "--jwks-url",
            jwks_server.url("/redirect"),
        )
        token = _token(stack, jwks_server, issuer)

        response = _call(edge, "order-sign", _bearer(token))

        assert 503 == response.status

    def test_http_jwks_url_rejected(self, stack, new_org):
        """Only https JWK Set URLs can be registered."""
        org = new_org()

        completed = cli_process(
            stack,
            "ehr",
            "register",
            "--org",
            org.org_id,
            "--issuer",
            "https://ehr.example.org/plain",
            "--jwks-url",
            "http://127.0.0.1:9/jwks",
        )

        assert 1 == completed.returncode
        assert "jwksUrl" in completed.stderr

    @pytest.mark.parametrize(
        "url",
        [
            "https://169.254.169.254/jwks",
            "https://[::ffff:169.254.169.254]/jwks",
            "https://2852039166/jwks",
            "https://0251.0376.0251.0376/jwks",
        ],
    )
    def test_metadata_address_rejected(self, stack, new_org, url):
        """A link-local host is refused in every spelling of it."""
        org = new_org()

        completed = cli_process(
            stack,
            "ehr",
            "register",
            "--org",
            org.org_id,
            "--issuer",
            "https://ehr.example.org/metadata",
            "--jwks-url",
            url,
        )

        assert 1 == completed.returncode
        assert "jwksUrl" in completed.stderr

    def test_issuer_belongs_to_one_org(self, stack, new_org, ehr, jwks_server):
        """Registering a taken issuer for another org is refused."""
        other = new_org()

        completed = cli_process(
            stack,
            "ehr",
            "register",
            "--org",
            other.org_id,
            "--issuer",
            ehr.issuer,
            "--jwks-url",
            jwks_server.url(),
        )

        assert 1 == completed.returncode
        assert "ALREADY_EXISTS" in completed.stderr
