"""Key scopes, listing, credentials in URLs and tenancy at the edge."""

import re
import time

import pytest

from services.common import methods

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}


def create_key(edge, api_key: str, **body) -> dict:
    response = edge.request("POST", "/v1/keys", body, {"x-api-key": api_key})
    assert 200 == response.status, response.body

    return response.json()


class TestScopes:
    def test_key_without_scope_gets_403(self, edge, new_org):
        """A review-only key cannot read the audit trail."""
        org = new_org()
        review_only = create_key(
            edge, org.api_key, scopes=["CLINICAL_REVIEW"]
        )["apiKey"]

        audit = edge.request(
            "GET", "/v1/audit", None, {"x-api-key": review_only}
        )
        review = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": review_only}
        )

        assert 403 == audit.status
        assert "AUDIT_READ" in audit.json()["message"]
        assert 200 == review.status
        # Key creation counted 1; the denied request passed key
        # authentication, so it counted too.
        assert "98" == audit.headers["x-ratelimit-remaining"]
        assert "97" == review.headers["x-ratelimit-remaining"]

    def test_key_cannot_grant_scopes_it_lacks(self, edge, new_org):
        org = new_org()
        manager = create_key(
            edge,
            org.api_key,
            scopes=["CLINICAL_REVIEW", "KEY_MANAGEMENT"],
        )["apiKey"]

        response = edge.request(
            "POST",
            "/v1/keys",
            {"scopes": ["AUDIT_READ"]},
            {"x-api-key": manager},
        )

        assert 400 == response.status
        assert "AUDIT_READ" in response.body.decode()

    def test_list_shows_no_secret(self, edge, new_org):
        org = new_org()
        created = create_key(edge, org.api_key, name="second")

        listed = edge.request(
            "GET", "/v1/keys", None, {"x-api-key": org.api_key}
        )

        assert 200 == listed.status
        text = listed.body.decode()
        assert org.api_key not in text
        assert created["apiKey"] not in text
        assert "arx_" not in text
        assert {org.key_id, created["key"]["keyId"]} == {
            key["keyId"] for key in listed.json()["keys"]
        }


class TestCredentialInUrl:
    @pytest.mark.parametrize("parameter", ["api_key", "key", "apikey"])
    def test_key_in_query_rejected(self, stack, edge, new_org, parameter):
        """A key in the URL is rejected and written to no log."""
        org = new_org()

        response = edge.request(
            "GET",
            f"/v1/audit?{parameter}={org.api_key}",
            None,
            {"x-api-key": org.api_key},
        )

        assert 400 == response.status
        assert "X-API-Key header" in response.json()["message"]
        assert org.api_key not in response.body.decode()
        for log_file in (stack.run_dir / "logs").glob("*.log"):
            assert org.api_key not in log_file.read_text(errors="replace")

    def test_key_shaped_value_rejected(self, edge, new_org):
        org = new_org()

        response = edge.request(
            "GET",
            f"/v1/audit?pageToken={org.api_key}",
            None,
            {"x-api-key": org.api_key},
        )

        assert 400 == response.status


def newest_event_id(edge, org) -> str:
    """Make a request as `org` and return its audit event's id."""
    key = {"x-api-key": org.api_key}
    edge.request("POST", REVIEW_PATH, RULES_ONLY, key)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = edge.request("GET", "/v1/audit?pageSize=1", None, key).json()[
            "auditEvents"
        ]
        if events:
            return events[0]["eventId"]
        time.sleep(0.25)
    raise AssertionError(f"no audit event of {org.org_id} appeared")


def _paths_with_ids() -> list:
    """Every customer REST route that names a resource by id."""
    return [
        pytest.param(method, id=method.action)
        for method in methods.public_methods()
        if method.http is not None
        and method.authentication == methods.Authentication.API_KEY
        and "{" in method.http.template
    ]


class TestTenancy:
    @pytest.mark.parametrize("method", _paths_with_ids())
    def test_other_org_ids_get_404(self, edge, new_org, method):
        """Another organization's ids are not found, whatever the route."""
        owner = new_org()
        intruder = new_org()
        other_ids = {
            "key_id": owner.key_id,
            "event_id": newest_event_id(edge, owner),
        }
        path = re.sub(
            r"\{([a-z_]+)\}",
            lambda match: other_ids[match.group(1)],
            method.http.template,
        )
        body = {} if method.http.method in ("POST", "PUT", "PATCH") else None

        response = edge.request(
            method.http.method, path, body, {"x-api-key": intruder.api_key}
        )

        assert 404 == response.status, response.body
        still_works = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": owner.api_key}
        )
        assert 200 == still_works.status

    def test_lists_hold_only_own_rows(self, edge, new_org):
        first = new_org()
        second = new_org()
        edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": second.api_key}
        )

        keys = edge.request(
            "GET", "/v1/keys", None, {"x-api-key": first.api_key}
        ).json()["keys"]

        assert {first.org_id} == {key["orgId"] for key in keys}
