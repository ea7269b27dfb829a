"""The strict body check, on real message types, without a server."""

import gzip
import json
import zlib

import grpc
import pytest
from arxio.auth.v1 import keys_pb2
from arxio.cds.v1 import cds_pb2

from services.common.errors import build_status
from services.common.strict_body import (
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    check_grpc_body,
    check_json_body,
)

REVIEW = cds_pb2.ClinicalReviewRequest.DESCRIPTOR
CREATE_KEY = keys_pb2.CreateKeyRequest.DESCRIPTOR
MARKER = "zzphimarker"


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

    @pytest.mark.parametrize(
        "text",
        [
            "1_0",
            " 10 ",
            "10 ",
            "\u0661\u0660",
            "\uff11\uff10",
            "1e1",
            "-0",
            "",
        ],
    )
    def test_loose_integer_text_rejected(self, text):
        """Only what proto3 JSON parsers read as an integer passes."""
        violations = check_json_body(
            json.dumps({"patient": {"ageYears": text}}).encode(), REVIEW, "*"
        )

        assert ["patient.ageYears"] == [v.field for v in violations]
        assert "must be a whole number" == violations[0].description

    @pytest.mark.parametrize("text", ["10", "010", "+10", "0"])
    def test_integer_text_accepted(self, text):
        assert [] == fields({"patient": {"ageYears": text}})

    def test_lone_surrogate_rejected_unquoted(self):
        body = f'{{"question": "{MARKER}\\ud800{MARKER}"}}'.encode()

        [violation] = check_json_body(body, REVIEW, "*")

        assert "question" == violation.field
        assert "Unicode" in violation.description
        assert MARKER not in violation.description

    def test_surrogate_pair_accepted(self):
        assert [] == check_json_body(
            b'{"question": "\\ud83d\\ude00"}', REVIEW, "*"
        )

    def test_surrogate_in_key_renders(self):
        """A field path with a surrogate still encodes as a status."""
        violations = check_json_body(b'{"a\\udc00b": 1}', REVIEW, "*")

        assert ["a?b"] == [v.field for v in violations]
        status = build_status(
            grpc.StatusCode.INVALID_ARGUMENT, "x", "id", violations
        )
        assert status.SerializeToString()

    def test_enum_case_folding_is_ascii_only(self):
        """str.upper() maps "ſ" to "S"; the edge folds ASCII only."""
        assert ["allergies[0].severity"] == fields(
            {"allergies": [{"substance": "latex", "severity": "\u017fevere"}]}
        )

    def test_list_over_limit_rejected(self):
        body = {"medications": [{"name": "x"}] * 101}

        assert ["medications"] == fields(body)

    def test_list_at_limit_accepted(self):
        assert [] == fields({"medications": [{"name": "x"}] * 100})

    def test_repeated_enum_value_rejected(self):
        body = json.dumps({"scopes": ["CLINICAL_REVIEW", "clinical_review"]})

        violations = check_json_body(body.encode(), CREATE_KEY, "*")

        assert ["scopes[1]"] == [v.field for v in violations]

    def test_repeated_enum_number_rejected(self):
        body = json.dumps({"scopes": ["AUDIT_READ", 2]})

        violations = check_json_body(body.encode(), CREATE_KEY, "*")

        assert ["scopes[1]"] == [v.field for v in violations]

    def test_scopes_repeated_1000_times_rejected(self):
        body = json.dumps({"scopes": ["CLINICAL_REVIEW"] * 1000})

        violations = check_json_body(body.encode(), CREATE_KEY, "*")

        assert ["scopes"] == [v.field for v in violations]
        assert "at most 100" in violations[0].description

    @pytest.mark.parametrize("depth", [65, 10_000])
    def test_deep_nesting_rejected_early(self, depth):
        body = b"[" * depth + b"]" * depth

        [violation] = check_json_body(body, REVIEW, "*")

        assert "body" == violation.field
        assert "nested" in violation.description


class TestGrpc:
    @staticmethod
    def frame(payload: bytes, compressed: bool = False) -> bytes:
        flag = b"\x01" if compressed else b"\x00"

        return flag + len(payload).to_bytes(4, "big") + payload

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

    def test_repeated_over_limit_rejected(self):
        message = cds_pb2.ClinicalReviewRequest(
            medications=[cds_pb2.Medication(name="x")] * 101
        )

        [violation] = check_grpc_body(
            self.frame(message.SerializeToString()), REVIEW
        )

        assert "medications" == violation.field

    def test_repeated_enum_value_rejected(self):
        message = keys_pb2.CreateKeyRequest(scopes=[1, 1])

        [violation] = check_grpc_body(
            self.frame(message.SerializeToString()), CREATE_KEY
        )

        assert "scopes" == violation.field


class TestCompressedGrpc:
    @staticmethod
    def frame(payload: bytes) -> bytes:
        return b"\x01" + len(payload).to_bytes(4, "big") + payload

    @staticmethod
    def unknown_field_message() -> bytes:
        message = cds_pb2.ClinicalReviewRequest(question="q")

        # Field 99, varint 1: unknown to ClinicalReviewRequest.
        return message.SerializeToString() + bytes([0x98, 0x06, 0x01])

    @pytest.mark.parametrize(
        ("encoding", "compress"),
        [("gzip", gzip.compress), ("deflate", zlib.compress)],
    )
    def test_unknown_field_found_inside(self, encoding, compress):
        """A compressed message gets the same check as a plain one."""
        body = self.frame(compress(self.unknown_field_message()))

        [violation] = check_grpc_body(body, REVIEW, encoding)

        assert "#99" == violation.field

    def test_valid_gzip_message_passes(self):
        message = cds_pb2.ClinicalReviewRequest(question="q" * 60_000)
        body = self.frame(gzip.compress(message.SerializeToString()))

        assert [] == check_grpc_body(body, REVIEW, "gzip")

    def test_nul_found_inside(self):
        message = cds_pb2.ClinicalReviewRequest(question="a\x00b")
        body = self.frame(gzip.compress(message.SerializeToString()))

        [violation] = check_grpc_body(body, REVIEW, "gzip")

        assert "question" == violation.field

    def test_over_limit_raises(self):
        """A small gzip body that inflates past 64 KiB is too large."""
        message = cds_pb2.ClinicalReviewRequest(question="x" * 4_000_000)
        compressed = gzip.compress(message.SerializeToString())
        assert len(compressed) < MAX_MESSAGE_BYTES

        with pytest.raises(MessageTooLarge) as raised:
            check_grpc_body(self.frame(compressed), REVIEW, "gzip")

        assert "64 KiB" in str(raised.value)

    def test_limit_counts_every_frame(self):
        message = cds_pb2.ClinicalReviewRequest(question="x" * 40_000)
        frame = self.frame(gzip.compress(message.SerializeToString()))

        with pytest.raises(MessageTooLarge):
            check_grpc_body(frame + frame, REVIEW, "gzip")

    @pytest.mark.parametrize(
        "encoding", ["", "identity", "snappy", "br", "GZIP", " gzip"]
    )
    def test_unusable_encoding_named(self, encoding):
        body = self.frame(gzip.compress(b""))

        [violation] = check_grpc_body(body, REVIEW, encoding)

        assert "body" == violation.field
        assert "grpc-encoding" in violation.description

    @pytest.mark.parametrize(
        "payload",
        [
            b"not gzip at all",
            gzip.compress(b"\x0a\x01q")[:-6],
            gzip.compress(b"\x0a\x01q") + b"trailing",
        ],
    )
    def test_corrupt_data_rejected(self, payload):
        [violation] = check_grpc_body(self.frame(payload), REVIEW, "gzip")

        assert "not valid gzip" in violation.description

    def test_unknown_flag_rejected(self):
        body = b"\x02" + (0).to_bytes(4, "big")

        [violation] = check_grpc_body(body, REVIEW, "gzip")

        assert "frame" in violation.description
