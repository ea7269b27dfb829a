import math

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds.validation import validate_request


def _fields(request: cds_pb2.ClinicalReviewRequest) -> list[str]:
    return [violation.field for violation in validate_request(request)]


def _valid_request() -> cds_pb2.ClinicalReviewRequest:
    return cds_pb2.ClinicalReviewRequest(
        patient=cds_pb2.Patient(
            age_years=70,
            sex=cds_pb2.Patient.Sex.FEMALE,
            weight_kg=62.5,
            egfr=48,
        ),
        medications=[
            cds_pb2.Medication(
                name="warfarin",
                rxnorm="11289",
                dose=cds_pb2.Dose(value=5, unit="mg"),
                route="oral",
                frequency="daily",
            )
        ],
        conditions=[cds_pb2.Condition(name="atrial fibrillation")],
        allergies=[
            cds_pb2.Allergy(
                substance="penicillin",
                reaction="hives",
                severity=cds_pb2.Allergy.Severity.MODERATE,
            )
        ],
        question="Is this regimen safe?",
    )


class TestValidateRequest:
    def test_valid_request_has_no_violations(self):
        """A request within every limit passes."""
        assert [] == validate_request(_valid_request())

    def test_empty_request_is_valid(self):
        """Every field is optional at the top level."""
        assert [] == validate_request(cds_pb2.ClinicalReviewRequest())

    @pytest.mark.parametrize(
        "field", ["medications", "conditions", "allergies"]
    )
    def test_list_over_maximum(self, field):
        """Lists take at most 100 items."""
        request = cds_pb2.ClinicalReviewRequest()
        item = {
            "medications": cds_pb2.Medication(name="warfarin"),
            "conditions": cds_pb2.Condition(name="hypertension"),
            "allergies": cds_pb2.Allergy(substance="sulfa"),
        }[field]
        getattr(request, field).extend([item] * 100)
        assert [] == _fields(request)

        getattr(request, field).append(item)

        assert [field] == _fields(request)

    @pytest.mark.parametrize(
        ("path", "build"),
        [
            (
                "medications[3].name",
                lambda text: {
                    "medications": [{"name": "a"}] * 3 + [{"name": text}]
                },
            ),
            (
                "medications[0].route",
                lambda text: {"medications": [{"name": "a", "route": text}]},
            ),
            (
                "medications[0].frequency",
                lambda text: {
                    "medications": [{"name": "a", "frequency": text}]
                },
            ),
            (
                "medications[0].dose.unit",
                lambda text: {
                    "medications": [{"name": "a", "dose": {"unit": text}}]
                },
            ),
            (
                "conditions[0].name",
                lambda text: {"conditions": [{"name": text}]},
            ),
            (
                "conditions[0].icd10",
                lambda text: {"conditions": [{"name": "a", "icd10": text}]},
            ),
            (
                "conditions[0].snomed",
                lambda text: {"conditions": [{"name": "a", "snomed": text}]},
            ),
            (
                "allergies[0].substance",
                lambda text: {"allergies": [{"substance": text}]},
            ),
            (
                "allergies[0].reaction",
                lambda text: {
                    "allergies": [{"substance": "a", "reaction": text}]
                },
            ),
        ],
    )
    def test_string_over_200_characters(self, path, build):
        """Strings take at most 200 characters and name their JSON path."""
        at_limit = cds_pb2.ClinicalReviewRequest(**_messages(build("x" * 200)))
        over = cds_pb2.ClinicalReviewRequest(**_messages(build("x" * 201)))

        assert [] == _fields(at_limit)
        assert [path] == _fields(over)

    def test_question_over_2000_characters(self):
        """The question takes at most 2,000 characters."""
        assert [] == _fields(
            cds_pb2.ClinicalReviewRequest(question="q" * 2000)
        )
        assert ["question"] == _fields(
            cds_pb2.ClinicalReviewRequest(question="q" * 2001)
        )

    @pytest.mark.parametrize("name", ["", "   "])
    def test_medication_needs_name_or_rxnorm(self, name):
        """A medication without a name or an RxNorm code is rejected."""
        request = cds_pb2.ClinicalReviewRequest(
            medications=[cds_pb2.Medication(name=name)]
        )

        assert ["medications[0].name"] == _fields(request)

    def test_rxnorm_alone_is_enough(self):
        """A medication can be given by RxNorm code only."""
        request = cds_pb2.ClinicalReviewRequest(
            medications=[cds_pb2.Medication(rxnorm="11289")]
        )

        assert [] == _fields(request)

    @pytest.mark.parametrize("rxnorm", ["RxNorm:11289", "11289a", "١٢٣"])
    def test_rxnorm_must_be_numeric(self, rxnorm):
        """An RxNorm code is a plain ASCII number."""
        request = cds_pb2.ClinicalReviewRequest(
            medications=[cds_pb2.Medication(name="warfarin", rxnorm=rxnorm)]
        )

        assert ["medications[0].rxnorm"] == _fields(request)

    @pytest.mark.parametrize("substance", ["", "  "])
    def test_allergy_needs_substance(self, substance):
        """An allergy without a substance is rejected."""
        request = cds_pb2.ClinicalReviewRequest(
            allergies=[cds_pb2.Allergy(substance=substance, reaction="rash")]
        )

        assert ["allergies[0].substance"] == _fields(request)

    def test_condition_needs_name_or_code(self):
        """A condition without a name or code is rejected."""
        request = cds_pb2.ClinicalReviewRequest(
            conditions=[cds_pb2.Condition()]
        )

        assert ["conditions[0].name"] == _fields(request)

    @pytest.mark.parametrize(
        ("age", "valid"), [(0, True), (130, True), (131, False)]
    )
    def test_age_from_0_to_130(self, age, valid):
        """ageYears must lie between 0 and 130."""
        request = cds_pb2.ClinicalReviewRequest(
            patient=cds_pb2.Patient(age_years=age)
        )

        assert ([] if valid else ["patient.ageYears"]) == _fields(request)

    @pytest.mark.parametrize(
        ("weight", "valid"),
        [
            (0.1, True),
            (700, True),
            (0, False),
            (-1, False),
            (700.1, False),
            (math.nan, False),
            (math.inf, False),
        ],
    )
    def test_weight_above_0_to_700(self, weight, valid):
        """weightKg must be above 0 and at most 700."""
        request = cds_pb2.ClinicalReviewRequest(
            patient=cds_pb2.Patient(weight_kg=weight)
        )

        assert ([] if valid else ["patient.weightKg"]) == _fields(request)

    @pytest.mark.parametrize(
        ("egfr", "valid"),
        [
            (0, True),
            (300, True),
            (-0.1, False),
            (300.1, False),
            (math.nan, False),
        ],
    )
    def test_egfr_from_0_to_300(self, egfr, valid):
        """egfr must lie between 0 and 300."""
        request = cds_pb2.ClinicalReviewRequest(
            patient=cds_pb2.Patient(egfr=egfr)
        )

        assert ([] if valid else ["patient.egfr"]) == _fields(request)

    @pytest.mark.parametrize(
        ("value", "valid"),
        [
            (0, True),
            (2.5, True),
            (-1, False),
            (math.inf, False),
            (math.nan, False),
        ],
    )
    def test_dose_value_finite_and_not_negative(self, value, valid):
        """A dose value is a finite number of 0 or more."""
        request = cds_pb2.ClinicalReviewRequest(
            medications=[
                cds_pb2.Medication(
                    name="warfarin", dose=cds_pb2.Dose(value=value)
                )
            ]
        )

        expected = [] if valid else ["medications[0].dose.value"]
        assert expected == _fields(request)

    def test_unknown_enum_values_are_rejected(self):
        """Enum numbers outside the API's values are rejected."""
        request = cds_pb2.ClinicalReviewRequest(
            patient=cds_pb2.Patient(sex=9),
            allergies=[cds_pb2.Allergy(substance="sulfa", severity=7)],
        )

        assert ["patient.sex", "allergies[0].severity"] == _fields(request)

    def test_reports_every_violation(self):
        """All violations are returned, not only the first."""
        request = _valid_request()
        request.patient.age_years = 200
        request.patient.egfr = -5
        request.medications.add(name="")
        request.medications[0].name = "n" * 201
        request.allergies.add(substance="")
        request.question = "q" * 2001

        assert [
            "patient.ageYears",
            "patient.egfr",
            "medications[0].name",
            "medications[1].name",
            "allergies[1].substance",
            "question",
        ] == _fields(request)

    def test_descriptions_explain_the_limit(self):
        """Each description gives the limit, never the value received."""
        request = cds_pb2.ClinicalReviewRequest(
            patient=cds_pb2.Patient(age_years=131)
        )

        [violation] = validate_request(request)
        assert "must be 0 to 130 years" == violation.description

    def test_descriptions_never_quote_values(self):
        """Out-of-range numbers are patient data: no message repeats them."""
        request = cds_pb2.ClinicalReviewRequest(
            patient=cds_pb2.Patient(
                age_years=4321, weight_kg=8765.5, egfr=987.25, sex=77
            ),
            medications=[
                cds_pb2.Medication(
                    name="warfarin", dose=cds_pb2.Dose(value=-6543.5)
                )
            ],
            allergies=[cds_pb2.Allergy(substance="latex", severity=55)],
        )

        descriptions = [v.description for v in validate_request(request)]

        assert 6 == len(descriptions)
        for value in ("4321", "8765", "987", "77", "6543", "55"):
            assert not [text for text in descriptions if value in text], value


def _messages(fields: dict) -> dict:
    """Turn nested dicts of request fields into proto messages."""
    return {
        "medications": [
            cds_pb2.Medication(
                **{
                    key: cds_pb2.Dose(**value) if key == "dose" else value
                    for key, value in item.items()
                }
            )
            for item in fields.get("medications", [])
        ],
        "conditions": [
            cds_pb2.Condition(**item) for item in fields.get("conditions", [])
        ],
        "allergies": [
            cds_pb2.Allergy(**item) for item in fields.get("allergies", [])
        ],
    }
