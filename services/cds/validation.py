"""Check a clinical review request against the API's limits.

Field paths are the JSON names that clients send (`medications[3].name`,
`patient.ageYears`), so the error response points at the field to fix.
Descriptions give the limit but never the value, which is patient data.
"""

import math
from collections.abc import Iterator, Sequence

from arxio.cds.v1 import cds_pb2

from services.common.errors import FieldViolation

MAX_ITEMS = 100
"""Maximum number of medications, of conditions and of allergies."""
MAX_STRING_LENGTH = 200
"""Maximum length in characters of every string except `question`."""
MAX_QUESTION_LENGTH = 2000
MAX_AGE_YEARS = 130
MAX_WEIGHT_KG = 700
MAX_EGFR = 300
"""Maximum eGFR in mL/min/1.73 m2 that the API accepts."""


def validate_request(
    request: cds_pb2.ClinicalReviewRequest,
) -> list[FieldViolation]:
    """Return every violation in the request, or an empty list."""
    return [
        *_patient_violations(request.patient),
        *_list_violations("medications", request.medications),
        *_list_violations("conditions", request.conditions),
        *_list_violations("allergies", request.allergies),
        *_medication_violations(request.medications),
        *_condition_violations(request.conditions),
        *_allergy_violations(request.allergies),
        *_text_violations("question", request.question, MAX_QUESTION_LENGTH),
    ]


def _patient_violations(patient: cds_pb2.Patient) -> Iterator[FieldViolation]:
    if patient.HasField("age_years") and patient.age_years > MAX_AGE_YEARS:
        yield FieldViolation(
            "patient.ageYears",
            f"must be 0 to {MAX_AGE_YEARS} years",
        )
    if patient.HasField("weight_kg") and not (
        0 < patient.weight_kg <= MAX_WEIGHT_KG
    ):
        yield FieldViolation(
            "patient.weightKg",
            f"must be above 0 and at most {MAX_WEIGHT_KG} kg",
        )
    if patient.HasField("egfr") and not (0 <= patient.egfr <= MAX_EGFR):
        yield FieldViolation(
            "patient.egfr",
            f"must be 0 to {MAX_EGFR} mL/min/1.73 m2",
        )
    if patient.sex not in cds_pb2.Patient.Sex.values():
        yield FieldViolation("patient.sex", "is not a known value")


def _list_violations(
    field: str, items: Sequence[object]
) -> Iterator[FieldViolation]:
    if len(items) > MAX_ITEMS:
        yield FieldViolation(
            field, f"at most {MAX_ITEMS} items allowed, got {len(items)}"
        )


def _text_violations(
    field: str, value: str, maximum: int = MAX_STRING_LENGTH
) -> Iterator[FieldViolation]:
    if len(value) > maximum:
        yield FieldViolation(
            field,
            f"must be at most {maximum} characters, got {len(value)}",
        )


def _medication_violations(
    medications: Sequence[cds_pb2.Medication],
) -> Iterator[FieldViolation]:
    for index, medication in enumerate(medications):
        path = f"medications[{index}]"
        for field in ("name", "rxnorm", "route", "frequency"):
            yield from _text_violations(
                f"{path}.{field}", getattr(medication, field)
            )
        if not medication.name.strip() and not medication.rxnorm.strip():
            yield FieldViolation(f"{path}.name", "give a name or an rxnorm")
        rxnorm = medication.rxnorm.strip()
        if rxnorm and not (rxnorm.isascii() and rxnorm.isdigit()):
            yield FieldViolation(
                f"{path}.rxnorm",
                "must be a numeric RxNorm concept id (RXCUI), such as 11289",
            )
        if medication.HasField("dose"):
            dose = medication.dose
            if not math.isfinite(dose.value) or dose.value < 0:
                yield FieldViolation(
                    f"{path}.dose.value",
                    "must be a finite number of 0 or more",
                )
            yield from _text_violations(f"{path}.dose.unit", dose.unit)


def _condition_violations(
    conditions: Sequence[cds_pb2.Condition],
) -> Iterator[FieldViolation]:
    for index, condition in enumerate(conditions):
        path = f"conditions[{index}]"
        for field in ("name", "icd10", "snomed"):
            yield from _text_violations(
                f"{path}.{field}", getattr(condition, field)
            )
        if not any(
            getattr(condition, field).strip()
            for field in ("name", "icd10", "snomed")
        ):
            yield FieldViolation(
                f"{path}.name", "give a name, an icd10 or a snomed code"
            )


def _allergy_violations(
    allergies: Sequence[cds_pb2.Allergy],
) -> Iterator[FieldViolation]:
    for index, allergy in enumerate(allergies):
        path = f"allergies[{index}]"
        yield from _text_violations(f"{path}.substance", allergy.substance)
        yield from _text_violations(f"{path}.reaction", allergy.reaction)
        if not allergy.substance.strip():
            yield FieldViolation(f"{path}.substance", "is required")
        if allergy.severity not in cds_pb2.Allergy.Severity.values():
            yield FieldViolation(f"{path}.severity", "is not a known value")
