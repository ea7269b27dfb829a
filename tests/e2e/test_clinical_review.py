"""Clinical reviews through the real edge, services and model runtime."""

import json

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from services.launcher.stack import REPO_ROOT

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
EXAMPLE = json.loads((REPO_ROOT / "examples" / "review.json").read_text())


def interaction_subjects(findings: list[dict]) -> list[set[str]]:
    return [
        set(finding["subjects"])
        for finding in findings
        if finding["category"] == "DRUG_INTERACTION"
    ]


class TestRestReview:
    def test_warfarin_ibuprofen_interaction_found(self, edge, new_org):
        """A Free key gets the warfarin-ibuprofen interaction over REST."""
        org = new_org()

        response = edge.request(
            "POST", REVIEW_PATH, EXAMPLE, {"x-api-key": org.api_key}
        )

        assert 200 == response.status, response.body
        review = response.json()
        assert {"warfarin", "ibuprofen"} in interaction_subjects(
            review["findings"]
        )
        assert review["knowledgeBaseVersion"]
        assert review["risk"]["level"] in ("HIGH", "CRITICAL")

    def test_model_review_is_marked(self, edge, new_org):
        """The model's narrative and recommendations are marked as such."""
        org = new_org()

        review = edge.request(
            "POST", REVIEW_PATH, EXAMPLE, {"x-api-key": org.api_key}
        ).json()

        model_review = review["modelReview"]
        assert "OK" == model_review["status"], model_review
        assert model_review["summary"]
        assert model_review["model"]
        origins = {item["origin"] for item in review["recommendations"]}
        assert "MODEL" in origins

    def test_rules_only_skips_model(self, edge, new_org):
        """`options.modelReview: false` returns findings with SKIPPED."""
        org = new_org()
        body = EXAMPLE | {"options": {"modelReview": False}}

        review = edge.request(
            "POST", REVIEW_PATH, body, {"x-api-key": org.api_key}
        ).json()

        assert "SKIPPED" == review["modelReview"]["status"]
        assert {"warfarin", "ibuprofen"} in interaction_subjects(
            review["findings"]
        )
        origins = {item["origin"] for item in review["recommendations"]}
        assert "MODEL" not in origins

    def test_form_encoded_body_is_reviewed(self, edge, new_org):
        """A body sent as curl -d sends it, without a JSON type, works."""
        org = new_org()

        response = edge.request(
            "POST",
            REVIEW_PATH,
            json.dumps(EXAMPLE | {"options": {"modelReview": False}}).encode(),
            {
                "x-api-key": org.api_key,
                "content-type": "application/x-www-form-urlencoded",
            },
        )

        assert 200 == response.status, response.body
        assert response.json()["findings"]

    def test_too_many_medications_rejected(self, edge, new_org):
        """101 medications give 400 naming the field."""
        org = new_org()
        body = {"medications": [{"name": "warfarin"}] * 101}

        response = edge.request(
            "POST", REVIEW_PATH, body, {"x-api-key": org.api_key}
        )

        assert 400 == response.status
        error = response.json()
        assert 3 == error["code"]
        violations = [
            violation["field"]
            for detail in error["details"]
            for violation in detail.get("fieldViolations", [])
        ]
        assert "medications" in violations

    def test_response_echoes_no_demographics(self, edge, new_org):
        """The response carries no patient field back."""
        org = new_org()
        body = EXAMPLE | {"options": {"modelReview": False}}

        review = edge.request(
            "POST", REVIEW_PATH, body, {"x-api-key": org.api_key}
        ).json()

        assert "patient" not in review
        assert "ageYears" not in json.dumps(review)


class TestGrpcReview:
    def test_warfarin_ibuprofen_interaction_found(self, edge, new_org):
        """The same review works over a native gRPC stub with x-api-key."""
        org = new_org()
        request = cds_pb2.ClinicalReviewRequest(
            medications=[
                cds_pb2.Medication(name="warfarin"),
                cds_pb2.Medication(name="ibuprofen"),
            ],
            options=cds_pb2.ReviewOptions(model_review=False),
        )

        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            reply, call = stub.ClinicalReview.with_call(
                request, metadata=[("x-api-key", org.api_key)], timeout=30
            )

        pairs = [
            set(finding.subjects)
            for finding in reply.findings
            if finding.category == cds_pb2.Finding.DRUG_INTERACTION
        ]
        assert {"warfarin", "ibuprofen"} in pairs
        headers = dict(call.initial_metadata())
        assert "100" == headers["x-ratelimit-limit"]

    def test_missing_key_unauthenticated(self, edge):
        """A gRPC call without x-api-key fails with UNAUTHENTICATED."""
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    cds_pb2.ClinicalReviewRequest(), timeout=30
                )

        assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()
