"""Key scopes, expiry, rotation, revocation, credentials in URLs and
tenancy at the edge."""

import datetime
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
        assert "never in the URL" in response.json()["message"]
        assert org.api_key not in response.body.decode()
        for log_file in (stack.run_dir / "logs").glob("*.log"):
            assert org.api_key not in log_file.read_text(errors="replace")

    @pytest.mark.parametrize("method", ["DELETE", "GET"])
    def test_key_in_path_rejected(self, stack, edge, new_org, method):
        """A key pasted where an id belongs is never echoed or logged."""
        org = new_org()
        path = (
            f"/v1/keys/{org.api_key}"
            if method == "DELETE"
            else f"/v1/audit/{org.api_key}"
        )

        response = edge.request(method, path, None, {"x-api-key": org.api_key})

        assert 400 == response.status
        assert "never in the URL" in response.json()["message"]
        assert org.api_key not in response.body.decode()
        for log_file in stack.run_dir.rglob("*.log"):
            assert org.api_key not in log_file.read_text(errors="replace")

    @pytest.mark.parametrize("parameter", ["access_token", "authorization"])
    def test_operator_token_in_query_rejected(self, stack, edge, parameter):
        token = stack.operator_token

        response = edge.request(
            "GET",
            f"/v1/operator/organizations?{parameter}={token}",
            None,
            {"authorization": f"Bearer {token}"},
        )

        assert 400 == response.status
        assert token not in response.body.decode()

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


def in_hours(hours: float) -> str:
    """Return an RFC 3339 UTC time `hours` from now, whole seconds."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        hours=hours
    )

    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def listed_key(edge, api_key: str, key_id: str) -> dict:
    keys = edge.request(
        "GET", "/v1/keys?pageSize=1000", None, {"x-api-key": api_key}
    ).json()["keys"]
    [key] = [key for key in keys if key["keyId"] == key_id]

    return key


def rotate(edge, api_key: str, key_id: str, grace: str = "3600s"):
    return edge.request(
        "POST",
        f"/v1/keys/{key_id}:rotate",
        {"gracePeriod": grace},
        {"x-api-key": api_key},
    )


class TestExpiry:
    def test_rotation_cannot_outlive_caller(self, edge, new_org):
        """A key that expires in an hour cannot rotate in a permanent key."""
        org = new_org()
        short = create_key(edge, org.api_key, expireTime=in_hours(1))
        target = create_key(edge, org.api_key, name="permanent")
        assert "expireTime" not in target["key"]

        rotated = rotate(edge, short["apiKey"], target["key"]["keyId"])

        assert 200 == rotated.status, rotated.body
        assert (
            short["key"]["expireTime"] == rotated.json()["key"]["expireTime"]
        )

    def test_rotated_key_in_grace_cannot_outlive_it(self, edge, new_org):
        """A rotated-away key cannot mint a key that outlives its grace."""
        org = new_org()
        old = create_key(edge, org.api_key, name="leaked")
        old_id = old["key"]["keyId"]
        assert 200 == rotate(edge, org.api_key, old_id).status
        grace_end = listed_key(edge, org.api_key, old_id)["expireTime"]

        created = create_key(edge, old["apiKey"], name="from the old key")

        assert grace_end == created["key"]["expireTime"]

    def test_second_rotation_keeps_expiry(self, edge, new_org):
        """Rotating a key in its grace period gives a permanent key."""
        org = new_org()
        target = create_key(edge, org.api_key, name="rotated twice")
        target_id = target["key"]["keyId"]
        assert 200 == rotate(edge, org.api_key, target_id).status

        again = rotate(edge, org.api_key, target_id)

        assert 200 == again.status, again.body
        assert "expireTime" not in again.json()["key"]
        assert "ACTIVE" == again.json()["key"]["state"]

    def test_second_rotation_keeps_own_expiry(self, edge, new_org):
        """The replacement keeps the expiry the key was created with."""
        org = new_org()
        expire_time = in_hours(48)
        target = create_key(edge, org.api_key, expireTime=expire_time)
        target_id = target["key"]["keyId"]
        assert 200 == rotate(edge, org.api_key, target_id).status

        again = rotate(edge, org.api_key, target_id)

        assert 200 == again.status, again.body
        assert expire_time == again.json()["key"]["expireTime"]

    def test_states_match_their_meaning(self, edge, new_org):
        """EXPIRING means rotated away; an expiry alone is ACTIVE."""
        org = new_org()
        dated = create_key(edge, org.api_key, expireTime=in_hours(2))
        rotated = create_key(edge, org.api_key, name="to rotate")
        rotated_id = rotated["key"]["keyId"]
        assert 200 == rotate(edge, org.api_key, rotated_id).status

        assert "ACTIVE" == dated["key"]["state"]
        listed = listed_key(edge, org.api_key, dated["key"]["keyId"])
        assert "ACTIVE" == listed["state"]
        assert "EXPIRING" == listed_key(edge, org.api_key, rotated_id)["state"]


class TestRevocation:
    def test_revoke_needs_the_key_scopes(self, edge, new_org):
        """A key-management-only key cannot revoke a broader key."""
        org = new_org()
        manager = create_key(edge, org.api_key, scopes=["KEY_MANAGEMENT"])[
            "apiKey"
        ]

        response = edge.request(
            "DELETE", f"/v1/keys/{org.key_id}", None, {"x-api-key": manager}
        )

        assert 403 == response.status, response.body
        message = response.json()["message"]
        assert "CLINICAL_REVIEW" in message
        assert "revoke it with a key that has them" in message
        review = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": org.api_key}
        )
        assert 200 == review.status

    def test_revoke_key_with_same_scopes(self, edge, new_org):
        org = new_org()
        manager = create_key(edge, org.api_key, scopes=["KEY_MANAGEMENT"])
        peer = create_key(edge, org.api_key, scopes=["KEY_MANAGEMENT"])

        response = edge.request(
            "DELETE",
            f"/v1/keys/{peer['key']['keyId']}",
            None,
            {"x-api-key": manager["apiKey"]},
        )

        assert 200 == response.status, response.body
        assert "REVOKED" == response.json()["state"]

    def test_rotate_revoked_key_fails(self, edge, new_org):
        org = new_org()
        revoked = create_key(edge, org.api_key, name="revoked")
        revoked_id = revoked["key"]["keyId"]
        edge.request(
            "DELETE",
            f"/v1/keys/{revoked_id}",
            None,
            {"x-api-key": org.api_key},
        )

        response = rotate(edge, org.api_key, revoked_id)

        assert 400 == response.status, response.body
        assert 9 == response.json()["code"]
        assert "revoked" in response.json()["message"]

    def test_malformed_key_id_not_echoed(self, edge, new_org):
        """An id that no key can have is rejected without being echoed."""
        org = new_org()
        key_id = "key_" + "z" * 3000

        revoked = edge.request(
            "DELETE", f"/v1/keys/{key_id}", None, {"x-api-key": org.api_key}
        )
        rotated = rotate(edge, org.api_key, key_id)

        for response in (revoked, rotated):
            assert 404 == response.status, response.body
            assert "key ids are key_" in response.json()["message"]
            assert "z" * 100 not in response.body.decode()
