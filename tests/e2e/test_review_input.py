"""Bad review input through the edge: 400s that name the field and limit.

Input the engine cannot read, as opposed to invalid input, is no error:
the review returns and lists it as not screened.
"""

import pytest

from services.cds.knowledge_base import load_knowledge_base
from tests.suite import Organization

KB = load_knowledge_base()

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {"options": {"modelReview": False}}


def violations(response) -> dict[str, str]:
    """Return the field violations of a 400, by field."""
    error = response.json()
    assert 3 == error["code"], error

    return {
        violation["field"]: violation["description"]
        for detail in error["details"]
        for violation in detail.get("fieldViolations", [])
    }


@pytest.fixture(scope="module")
def send(stack, edge):
    key = {"x-api-key": Organization(stack).api_key}

    def post(body: dict):
        return edge.request("POST", REVIEW_PATH, RULES_ONLY | body, key)

    return post


class TestLimits:
    @pytest.mark.parametrize(
        ("body", "field", "limit"),
        [
            (
                {"medications": [{"name": "w" * 201}]},
                "medications[0].name",
                "200",
            ),
            (
                {"allergies": [{"substance": "s" * 201}]},
                "allergies[0].substance",
                "200",
            ),
            ({"question": "q" * 2001}, "question", "2000"),
            ({"conditions": [{"name": "asthma"}] * 101}, "conditions", "100"),
            (
                {"allergies": [{"substance": "sulfa"}] * 101},
                "allergies",
                "100",
            ),
            ({"patient": {"ageYears": 131}}, "patient.ageYears", "130"),
            ({"patient": {"egfr": 301}}, "patient.egfr", "300"),
        ],
        ids=lambda value: value if isinstance(value, str) else None,
    )
    def test_over_limit_names_field_and_limit(self, send, body, field, limit):
        response = send(body)

        assert 400 == response.status, response.body
        found = violations(response)
        assert field in found, found
        assert limit in found[field]

    def test_unknown_enum_value_rejected(self, send):
        """An unknown sex is a 400 that names the field."""
        response = send({"patient": {"sex": "ROBOT"}})

        assert 400 == response.status, response.body
        assert "sex" in response.body.decode()

    def test_wrong_type_rejected(self, send):
        response = send({"patient": {"ageYears": "old"}})

        assert 400 == response.status, response.body
        assert "age" in response.body.decode().lower()


class TestLargeReviews:
    def test_hundred_medications_reviewed(self, send):
        """A full list gives its many findings, not a transcoder error."""
        names = sorted(drug.name for drug in KB.drugs.values())[:100]

        response = send(
            {
                "patient": {"ageYears": 80, "sex": "FEMALE", "egfr": 10},
                "medications": [{"name": name} for name in names],
            }
        )

        assert 200 == response.status, response.body[:300]
        assert len(response.body) > 64 * 1024
        assert response.json()["findings"]


class TestNotErrors:
    def test_empty_review_is_valid(self, send):
        """No medications: a review with no medication findings."""
        response = send({})

        assert 200 == response.status, response.body
        review = response.json()
        assert [] == review.get("findings", [])
        assert review["knowledgeBaseVersion"]

    def test_unknown_dose_unit_not_screened(self, send):
        """A unit the engine does not know is listed, not rejected."""
        response = send(
            {
                "patient": {"ageYears": 40, "sex": "MALE", "egfr": 90},
                "medications": [
                    {
                        "name": "acetaminophen",
                        "dose": {"value": 2, "unit": "tabs"},
                        "frequency": "q4h",
                    }
                ],
            }
        )

        assert 200 == response.status, response.body
        gaps = response.json()["notScreened"]
        assert [gap for gap in gaps if gap["subject"] == "acetaminophen"], gaps


class TestCraftedInput:
    """Input that once reached a query or a conversion unchecked."""

    @pytest.mark.parametrize(
        "token",
        [
            # A valid time with an id that is not a UUID.
            "WyIyMDI2LTEyLTA0VDAwOjAwOjAwKzAwOjAwIiwibm90LWEtdXVpZCJd",
            # Deeply nested JSON.
            "W1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tb" * 8,
        ],
    )
    def test_crafted_page_token_is_400(self, stack, edge, token):
        org = Organization(stack)

        response = edge.request(
            "GET",
            f"/v1/audit?pageToken={token}",
            None,
            {"x-api-key": org.api_key},
        )

        assert 400 == response.status, response.body
        assert "pageToken" in response.body.decode()
        assert "SELECT" not in response.body.decode()

    def test_unknown_scope_is_400(self, stack, edge):
        org = Organization(stack)

        response = edge.request(
            "POST", "/v1/keys", {"scopes": [99]}, {"x-api-key": org.api_key}
        )

        assert 400 == response.status, response.body
        assert "scope" in response.body.decode()

    def test_huge_grace_period_is_400(self, stack, edge):
        org = Organization(stack)

        response = edge.request(
            "POST",
            f"/v1/keys/{org.key_id}:rotate",
            {"gracePeriod": "315576000000s"},
            {"x-api-key": org.api_key},
        )
        keys = edge.request(
            "GET", "/v1/keys", None, {"x-api-key": org.api_key}
        ).json()["keys"]

        assert 400 == response.status, response.body
        assert "gracePeriod" in response.body.decode()
        assert 1 == len(keys)
