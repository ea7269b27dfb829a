"""Bodies are checked against their message type before any service.

The JSON transcoder alone would drop an unknown field and answer 200; the
edge's auth decision rejects it with 400 naming the field.
"""

import grpc
import pytest
from arxio.auth.v1 import keys_pb2, keys_pb2_grpc
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from tests.suite import Organization

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
HOOK_PATH = "/cds-services/arxio-order-sign"
# A value no reply may repeat: it stands for patient data in a request.
MARKER = "zzphimarker"
RULES_ONLY = {"options": {"modelReview": False}}


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


class TestValuesNeverQuoted:
    @pytest.mark.parametrize(
        "text", ["1_0", " 10 ", "10 ", "\u0661\u0660", "\uff11\uff10"]
    )
    def test_loose_integer_text_rejected(self, edge, key, text):
        """What Python's int() takes but proto3 JSON does not is named,
        before the transcoder can quote it."""
        body = RULES_ONLY | {"patient": {"ageYears": text}}

        response = edge.request("POST", REVIEW_PATH, body, key)

        assert 400 == response.status, response.body
        assert "whole number" in violations(response)["patient.ageYears"]
        assert text.strip() not in response.json()["message"]

    @pytest.mark.parametrize("text", ["010", "+10"])
    def test_integer_text_proto3_takes_accepted(self, edge, key, text):
        body = RULES_ONLY | {"patient": {"ageYears": text}}

        response = edge.request("POST", REVIEW_PATH, body, key)

        assert 200 == response.status, response.body

    @pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ud800x"])
    def test_lone_surrogate_named_not_echoed(self, edge, key, escape):
        body = f'{{"question": "{MARKER}{escape}{MARKER}"}}'.encode()

        response = edge.request(
            "POST",
            REVIEW_PATH,
            body,
            key | {"content-type": "application/json"},
        )

        assert 400 == response.status, response.body
        assert "Unicode" in violations(response)["question"]
        assert MARKER not in response.body.decode()

    @pytest.mark.parametrize(
        ("patient", "field"),
        [
            ({"ageYears": 4321}, "patient.ageYears"),
            ({"weightKg": 8765.5}, "patient.weightKg"),
            ({"egfr": 987.25}, "patient.egfr"),
        ],
    )
    def test_range_error_names_limit_only(self, edge, key, patient, field):
        response = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY | {"patient": patient}, key
        )

        assert 400 == response.status, response.body
        assert field in violations(response)
        value = str(next(iter(patient.values()))).split(".")[0]
        assert value not in response.body.decode()


class TestLimits:
    def test_repeated_scopes_rejected(self, edge, key):
        """A list cannot repeat one value a thousand times."""
        body = {"name": "x", "scopes": ["CLINICAL_REVIEW"] * 1000}

        response = edge.request("POST", "/v1/keys", body, key)

        assert 400 == response.status, response.body
        assert "at most 100" in violations(response)["scopes"]

    def test_scope_listed_twice_rejected(self, edge, key):
        body = {"name": "x", "scopes": ["AUDIT_READ", "audit_read"]}

        response = edge.request("POST", "/v1/keys", body, key)

        assert 400 == response.status, response.body
        assert "scopes[1]" in violations(response)

    def test_repeated_scopes_over_grpc_rejected(self, edge, key):
        read = keys_pb2.ApiKey.Scope.AUDIT_READ
        with edge.channel() as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.CreateKey(
                    keys_pb2.CreateKeyRequest(name="x", scopes=[read, read]),
                    metadata=list(key.items()),
                    timeout=30,
                )

        assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()

    @pytest.mark.parametrize("path", [REVIEW_PATH, HOOK_PATH])
    def test_deep_nesting_rejected(self, edge, key, path):
        """JSON nested 10,000 deep is a 400 naming the limit, not a 500."""
        body = b"[" * 10_000 + b"]" * 10_000

        response = edge.request(
            "POST", path, body, key | {"content-type": "application/json"}
        )

        assert 400 == response.status, response.body[:300]
        description = violations(response)["body"]
        assert "levels deep" in description


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
