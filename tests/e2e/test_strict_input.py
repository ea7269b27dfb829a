"""Bodies are checked against their message type before any service.

The JSON transcoder alone would drop an unknown field and answer 200; the
edge's auth decision rejects it with 400 naming the field.
"""

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from tests.suite import Organization

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"


@pytest.fixture(scope="module")
def key(stack) -> dict:
    return {"x-api-key": Organization(stack).api_key}


def violations(response) -> dict[str, str]:
    error = response.json()
    assert 3 == error["code"], error

    return {
        violation["field"]: violation["description"]
        for detail in error["details"]
        for violation in detail.get("fieldViolations", [])
    }


class TestUnknownFields:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"alergies": [{"substance": "penicillin"}]}, "alergies"),
            ({"patient": {"egfrr": 10}}, "patient.egfrr"),
            (
                {
                    "medications": [
                        {"name": "warfarin", "dose": {"unti": "mg"}}
                    ]
                },
                "medications[0].dose.unti",
            ),
            ({"options": {"modelReveiw": False}}, "options.modelReveiw"),
        ],
    )
    def test_unknown_field_is_named(self, edge, key, body, field):
        response = edge.request("POST", REVIEW_PATH, body, key)

        assert 400 == response.status, response.body
        assert field in violations(response)
        assert "x-request-id" in response.headers

    def test_misspelled_field_never_reaches_review(self, edge, key):
        """The review is not run without the allergies."""
        response = edge.request(
            "POST",
            REVIEW_PATH,
            {
                "medications": [{"name": "amoxicillin"}],
                "alergies": [{"substance": "penicillin"}],
            },
            key,
        )

        assert 400 == response.status
        assert "findings" not in response.json()


class TestTypes:
    @pytest.mark.parametrize(
        ("body", "field", "words"),
        [
            ({"patient": {"ageYears": "old"}}, "patient.ageYears", "whole"),
            ({"patient": {"ageYears": 4294967296}}, "patient.ageYears", "to"),
            ({"patient": {"ageYears": 1.5}}, "patient.ageYears", "whole"),
            ({"patient": {"sex": "ROBOT"}}, "patient.sex", "FEMALE"),
            ({"patient": {"pregnant": "yes"}}, "patient.pregnant", "true"),
            ({"medications": {"name": "x"}}, "medications", "list"),
            ({"medications": ["warfarin"]}, "medications[0]", "object"),
            ({"question": 42}, "question", "string"),
        ],
    )
    def test_wrong_type_is_named(self, edge, key, body, field, words):
        response = edge.request("POST", REVIEW_PATH, body, key)

        assert 400 == response.status, response.body
        found = violations(response)
        assert field in found, found
        assert words in found[field]

    def test_malformed_json_echoes_nothing(self, edge, key):
        response = edge.request(
            "POST",
            REVIEW_PATH,
            b'{"question": "zzphimarkermalformed',
            key | {"content-type": "application/json"},
        )

        assert 400 == response.status
        assert "zzphimarker" not in response.body.decode()
        assert "body" in violations(response)

    def test_invalid_utf8_rejected(self, edge, key):
        response = edge.request(
            "POST",
            REVIEW_PATH,
            b'{"question": "\\xff\\xfe"}'.replace(b"\\\\", b"\\"),
            key | {"content-type": "application/json"},
        )

        assert 400 == response.status

    def test_duplicate_key_rejected(self, edge, key):
        response = edge.request(
            "POST",
            REVIEW_PATH,
            b'{"question": "a", "question": "b"}',
            key | {"content-type": "application/json"},
        )

        assert 400 == response.status
        assert "question" in violations(response)


class TestNativeGrpc:
    def test_unknown_field_number_is_named(self, edge, key):
        """A message from a client with other definitions is rejected."""
        request = cds_pb2.ClinicalReviewRequest(
            options=cds_pb2.ReviewOptions(model_review=False)
        ).SerializeToString()
        # Field 99, varint 1: unknown to ClinicalReviewRequest.
        request += bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 1])
        with edge.channel() as channel:
            call = channel.unary_unary(
                "/arxio.cds.v1.ClinicalDecisionSupportService/ClinicalReview",
                request_serializer=lambda raw: raw,
                response_deserializer=cds_pb2.ClinicalReviewResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as raised:
                call(request, metadata=list(key.items()), timeout=30)

        assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
        trailers = dict(raised.value.trailing_metadata())
        status = status_pb2.Status.FromString(
            trailers["grpc-status-details-bin"]
        )
        bad_request = error_details_pb2.BadRequest()
        assert any(detail.Unpack(bad_request) for detail in status.details)
        assert "#99" == bad_request.field_violations[0].field

    def test_valid_grpc_review_passes(self, edge, key):
        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            response = stub.ClinicalReview(
                cds_pb2.ClinicalReviewRequest(
                    medications=[cds_pb2.Medication(name="warfarin")],
                    options=cds_pb2.ReviewOptions(model_review=False),
                ),
                metadata=list(key.items()),
                timeout=30,
            )

        assert response.knowledge_base_version
