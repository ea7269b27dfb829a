"""Patient data never reaches a log line, the database or the response."""

import psycopg
import pytest

from tests.e2e.test_audit import stored_rows

pytestmark = pytest.mark.e2e

# Distinctive strings that can only come from the request body.
MARKERS = {
    "medication": "zzphimarkerdrug",
    "condition": "zzphimarkercondition",
    "allergy": "zzphimarkerallergen",
    "question": "zzphimarkerquestion",
}


def review_body() -> dict:
    return {
        "patient": {"ageYears": 97, "sex": "female", "egfr": 17.5},
        "medications": [
            {"name": "warfarin"},
            {"name": MARKERS["medication"]},
        ],
        "conditions": [{"name": MARKERS["condition"]}],
        "allergies": [{"substance": MARKERS["allergy"]}],
        "question": f"Is {MARKERS['question']} a concern?",
    }


class TestNoPhiPersisted:
    def test_request_content_absent_from_logs(self, stack, edge, new_org):
        """No log file of any component contains request content."""
        org = new_org()

        response = edge.request(
            "POST",
            "/v1/cds/clinical-review",
            review_body(),
            {"x-api-key": org.api_key},
        )
        assert 200 == response.status
        stored_rows(stack, [response.headers["x-request-id"]])

        for log_file in (stack.run_dir / "logs").glob("*.log"):
            text = log_file.read_text(errors="replace")
            for field, marker in MARKERS.items():
                assert marker not in text, f"{field} in {log_file.name}"
            assert org.api_key not in text, f"API key in {log_file.name}"

    def test_request_content_absent_from_database(self, stack, edge, new_org):
        """No table holds request content or the API key."""
        org = new_org()
        response = edge.request(
            "POST",
            "/v1/cds/clinical-review",
            review_body() | {"options": {"modelReview": False}},
            {"x-api-key": org.api_key},
        )
        stored_rows(stack, [response.headers["x-request-id"]])

        with psycopg.connect(stack.admin_database_url) as connection:
            tables = connection.execute(
                "SELECT table_schema, table_name FROM information_schema"
                ".tables WHERE table_schema IN ('auth', 'audit', 'public')"
            ).fetchall()
            for schema, table in tables:
                dump = (
                    connection.execute(
                        f"SELECT string_agg(t::text, '') FROM \"{schema}\""
                        f'."{table}" t'
                    ).fetchone()[0]
                    or ""
                )
                for field, marker in MARKERS.items():
                    assert marker not in dump, f"{field} in {schema}.{table}"
                assert org.api_key not in dump, f"key in {schema}.{table}"

    def test_unrecognized_drug_reported_by_name(self, edge, new_org):
        """An unknown medication is reported back as not screened."""
        org = new_org()

        review = edge.request(
            "POST",
            "/v1/cds/clinical-review",
            review_body() | {"options": {"modelReview": False}},
            {"x-api-key": org.api_key},
        ).json()

        subjects = [item["subject"] for item in review["notScreened"]]
        assert MARKERS["medication"] in subjects
