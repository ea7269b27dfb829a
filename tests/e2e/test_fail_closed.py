"""With the auth service down, the edge answers 503 and lets nothing by."""

import pytest

from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rules_only_stack():
    """A second suite whose model server address has nothing behind it."""
    with own_stack(model_timeout=5.0) as running:
        yield running


class TestModelDown:
    def test_findings_return_without_model(self, rules_only_stack):
        """An unreachable model gives UNAVAILABLE and the findings still."""
        edge = EdgeClient(
            rules_only_stack.edge_port, rules_only_stack.certs_dir / "ca.crt"
        )
        org = Organization(rules_only_stack)

        response = edge.request(
            "POST",
            "/v1/cds/clinical-review",
            {"medications": [{"name": "warfarin"}, {"name": "ibuprofen"}]},
            {"x-api-key": org.api_key},
        )

        assert 200 == response.status, response.body
        review = response.json()
        assert "UNAVAILABLE" == review["modelReview"]["status"]
        assert review["modelReview"]["reason"]
        assert any(
            finding["category"] == "DRUG_INTERACTION"
            for finding in review["findings"]
        )


class TestAuthDown:
    def test_edge_fails_closed(self, rules_only_stack):
        """With auth stopped, a request with a key gets 503 JSON."""
        edge = EdgeClient(
            rules_only_stack.edge_port, rules_only_stack.certs_dir / "ca.crt"
        )
        org = Organization(rules_only_stack)
        rules_only_stack.child("auth").stop()

        response = edge.request(
            "POST",
            "/v1/cds/clinical-review",
            {"medications": [{"name": "warfarin"}]},
            {"x-api-key": org.api_key},
        )

        assert 503 == response.status
        error = response.json()
        assert 14 == error["code"]
        assert "findings" not in error
