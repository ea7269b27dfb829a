"""Map a hook's FHIR R4 resources to a clinical review request.

Only clinical facts cross over. The Patient gives age and sex, never its
name, identifiers or birth date. The medications, conditions and
allergies give their codes, names and doses, and the latest Observations
give eGFR, body weight and pregnancy status. The one resource id kept is
each draft MedicationRequest's own, so that a card can suggest removing
it.
"""

import datetime
from collections.abc import Iterator
from dataclasses import dataclass, field

from arxio.cds.v1 import cds_pb2
from pydantic import BaseModel, ValidationError

from services.cds.hooks import fhir
from services.cds.knowledge_base import KnowledgeBase
from services.cds.validation import MAX_ITEMS, MAX_STRING_LENGTH
from services.common.errors import FieldViolation

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10_SYSTEMS = (
    "http://hl7.org/fhir/sid/icd-10-cm",
    "http://hl7.org/fhir/sid/icd-10",
)
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
# LOINC codes of estimated GFR per 1.73 m2: MDRD (33914-3, 48642-3,
# 48643-1), CKD-EPI (62238-1, 88293-6, 88294-4), CKD-EPI 2021 creatinine
# (98979-8) and creatinine with cystatin C (98980-6), and the generic
# eGFR result (69405-9).
# NOTE: these codes and the answer codes below were written from LOINC's
# published terms but not checked against one LOINC release; a code that
# is missing here makes its result unread, so its check reports no input.
EGFR_CODES = frozenset(
    {
        "33914-3",
        "48642-3",
        "48643-1",
        "62238-1",
        "69405-9",
        "88293-6",
        "88294-4",
        "98979-8",
        "98980-6",
    }
)
# Body weight (29463-7) and body weight measured (3141-9), LOINC.
WEIGHT_CODES = frozenset({"29463-7", "3141-9"})
# Pregnancy status (82810-3), LOINC, and its answers: LOINC answer codes
# and the SNOMED CT concepts EHRs also send.
PREGNANCY_STATUS_CODE = "82810-3"
PREGNANCY_ANSWERS = {
    (LOINC, "LA15173-0"): True,
    (LOINC, "LA26683-5"): False,
    (SNOMED, "77386006"): True,
    (SNOMED, "60001007"): False,
}
# Kilograms per unit of a body weight quantity (UCUM codes and the unit
# texts EHRs send).
KILOGRAMS_PER_UNIT = {
    "kg": 1.0,
    "g": 0.001,
    "[lb_av]": 0.45359237,
    "lb": 0.45359237,
    "lbs": 0.45359237,
}
# Hours per UCUM unit of Timing.repeat.periodUnit.
HOURS_PER_PERIOD_UNIT = {
    "s": 1 / 3600,
    "min": 1 / 60,
    "h": 1,
    "d": 24,
    "wk": 168,
    "mo": 720,
    "a": 8760,
}
# Statuses of resources that no longer describe the patient.
ENDED_MEDICATION_STATUSES = frozenset(
    {"cancelled", "completed", "entered-in-error", "stopped", "not-taken"}
)
INACTIVE_CLINICAL_STATUSES = frozenset({"inactive", "remission", "resolved"})
EXCLUDED_VERIFICATION_STATUSES = frozenset({"refuted", "entered-in-error"})
EXCLUDED_OBSERVATION_STATUSES = frozenset(
    {"cancelled", "entered-in-error", "registered"}
)


class InvalidFhir(Exception):
    """Resources of a hook request that break FHIR R4 or the API limits."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__(", ".join(v.field for v in violations))
        self.violations = violations


@dataclass(frozen=True)
class MedicationOrigin:
    """Where one medication of the mapped request came from."""

    # JSON path of the resource in the hook request.
    path: str
    # True for the orders of the hook's draftOrders.
    draft: bool = False
    # True for orders the user has just selected (order-select), and for
    # every draft order of order-sign.
    selected: bool = False
    # `MedicationRequest/<id>` of a draft order, for a delete suggestion.
    reference: str = ""


@dataclass
class MappedReview:
    request: cds_pb2.ClinicalReviewRequest
    # One entry per item of request.medications, in order.
    origins: list[MedicationOrigin] = field(default_factory=list)


def _text(value: str) -> str:
    """Shorten a display text to the API's string limit."""
    return value.strip()[:MAX_STRING_LENGTH]


def _model(model: type[BaseModel], raw: object, path: str):
    """Validate one resource, naming each invalid element by its path."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        violations = []
        for problem in error.errors(include_input=False, include_url=False):
            location = "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}"
                for part in problem["loc"]
            )
            field = (path + location).lstrip(".")
            violations.append(FieldViolation(field, problem["msg"]))
        raise InvalidFhir(violations) from None


def resources_of(value: object, path: str) -> Iterator[tuple[str, dict]]:
    """Yield each resource of a prefetch value with its JSON path.

    The value is null (no data), one resource, or a Bundle whose entries
    hold resources. Entries without a resource are skipped.
    """
    if value is None:
        return
    if not isinstance(value, dict) or "resourceType" not in value:
        raise InvalidFhir(
            [FieldViolation(path, "must be a FHIR resource, a Bundle or null")]
        )
    if value["resourceType"] != "Bundle":
        yield path, value
        return
    bundle = _model(fhir.Bundle, value, path)
    for index, entry in enumerate(bundle.entry):
        if entry.resource is not None:
            yield f"{path}.entry[{index}].resource", entry.resource


def _birth_bound(birth_date: str) -> datetime.date:
    """Return the latest day a partial FHIR date allows, for a minimum age."""
    parts = [int(part) for part in birth_date.split("-")]
    if len(parts) == 3:
        return datetime.date(*parts)
    if len(parts) == 2:
        year, month = parts
        following = datetime.date(year + month // 12, month % 12 + 1, 1)

        return following - datetime.timedelta(days=1)

    return datetime.date(parts[0], 12, 31)


def age_in_years(birth_date: str, today: datetime.date) -> int:
    """Age on `today`, the youngest a partial birth date allows."""
    born = _birth_bound(birth_date)
    years = today.year - born.year
    if (today.month, today.day) < (born.month, born.day):
        years -= 1

    return years


def map_patient(
    raw: object, path: str, today: datetime.date
) -> cds_pb2.Patient:
    """Read age and sex from a Patient; every other element is ignored."""
    patient = cds_pb2.Patient()
    resources = list(resources_of(raw, path))
    if not resources:
        return patient
    resource_path, resource = resources[0]
    parsed = _model(fhir.Patient, resource, resource_path)
    if parsed.birthDate:
        try:
            age = age_in_years(parsed.birthDate, today)
        except ValueError:
            age = -1
        if not 0 <= age <= 130:
            raise InvalidFhir(
                [
                    FieldViolation(
                        f"{resource_path}.birthDate",
                        "must be a real date that gives an age of 0 to "
                        "130 years",
                    )
                ]
            )
        patient.age_years = age
    sexes = {
        "female": cds_pb2.Patient.FEMALE,
        "male": cds_pb2.Patient.MALE,
        "other": cds_pb2.Patient.OTHER,
        "unknown": cds_pb2.Patient.UNKNOWN,
    }
    if parsed.gender:
        patient.sex = sexes[parsed.gender]

    return patient


def _frequency(dosage: fhir.Dosage) -> str:
    """Describe a dosage's timing in words the dose check reads."""
    suffix = " as needed" if dosage.asNeededBoolean else ""
    timing = dosage.timing
    if timing is None:
        return ""
    repeat = timing.repeat
    if repeat and repeat.frequency and repeat.period and repeat.periodUnit:
        if repeat.periodUnit == "d" and repeat.period == 1:
            return f"{repeat.frequency} times daily{suffix}"
        hours = (
            repeat.period
            * HOURS_PER_PERIOD_UNIT[repeat.periodUnit]
            / repeat.frequency
        )

        return f"every {hours:g} hours{suffix}"
    if timing.code is not None:
        return _text(timing.code.label() + suffix)

    return ""


def map_medication(
    resource: fhir.MedicationRequest | fhir.MedicationStatement, path: str
) -> cds_pb2.Medication:
    medication = cds_pb2.Medication()
    concept = resource.medication_concept()
    if concept is not None:
        medication.name = _text(concept.label())
        codes = concept.codes(RXNORM)
        if codes:
            if not all(code.isascii() and code.isdigit() for code in codes):
                raise InvalidFhir(
                    [
                        FieldViolation(
                            f"{path}.medicationCodeableConcept.coding",
                            "an RxNorm code must be a numeric RXCUI",
                        )
                    ]
                )
            medication.rxnorm = codes[0]
    if not medication.name and not medication.rxnorm:
        medication.name = "unnamed medication"
    dosages = resource.dosages()
    if dosages:
        dosage = dosages[0]
        quantities = [
            entry.doseQuantity
            for entry in dosage.doseAndRate
            if entry.doseQuantity is not None
            and entry.doseQuantity.value is not None
        ]
        if quantities and quantities[0].value >= 0:
            quantity = quantities[0]
            medication.dose.value = float(quantity.value)
            medication.dose.unit = _text(quantity.unit or quantity.code or "")
        if dosage.route is not None:
            medication.route = _text(dosage.route.label())
        medication.frequency = _text(_frequency(dosage))

    return medication


def _clinically_current(
    clinical: fhir.CodeableConcept | None,
    verification: fhir.CodeableConcept | None,
) -> bool:
    clinical_codes = {c.code for c in (clinical.coding if clinical else [])}
    verified = {c.code for c in (verification.coding if verification else [])}
    if clinical_codes & INACTIVE_CLINICAL_STATUSES:
        return False

    return not verified & EXCLUDED_VERIFICATION_STATUSES


def map_condition(
    resource: fhir.Condition,
) -> cds_pb2.Condition | None:
    if resource.code is None:
        return None
    if not _clinically_current(
        resource.clinicalStatus, resource.verificationStatus
    ):
        return None
    icd10 = [
        code
        for system in ICD10_SYSTEMS
        for code in resource.code.codes(system)
    ]
    snomed = resource.code.codes(SNOMED)
    condition = cds_pb2.Condition(
        name=_text(resource.code.label()),
        icd10=_text(icd10[0]) if icd10 else "",
        snomed=_text(snomed[0]) if snomed else "",
    )
    if not (condition.name or condition.icd10 or condition.snomed):
        return None

    return condition


def map_allergy(
    resource: fhir.AllergyIntolerance, kb: KnowledgeBase
) -> cds_pb2.Allergy | None:
    if resource.code is None:
        return None
    if not _clinically_current(
        resource.clinicalStatus, resource.verificationStatus
    ):
        return None
    substance = resource.code.label()
    match = kb.resolve_allergy(substance)
    if not (match.allergy_classes or match.drugs):
        # A coded substance screens even when the EHR's text is a local
        # name the knowledge base does not know.
        coded = sorted(
            {
                kb.drugs[drug_id].name
                for code in resource.code.codes(RXNORM)
                for drug_id in kb.resolve_rxnorm(code)
            }
        )
        if coded:
            substance = " ".join(coded)
    if not substance.strip():
        return None
    severities = {
        "mild": cds_pb2.Allergy.MILD,
        "moderate": cds_pb2.Allergy.MODERATE,
        "severe": cds_pb2.Allergy.SEVERE,
    }
    severity = max(
        (severities[r.severity] for r in resource.reaction if r.severity),
        default=cds_pb2.Allergy.SEVERITY_UNSPECIFIED,
    )
    if (
        severity == cds_pb2.Allergy.SEVERITY_UNSPECIFIED
        and resource.criticality == "high"
    ):
        severity = cds_pb2.Allergy.SEVERE
    reactions = [
        manifestation.label()
        for reaction in resource.reaction
        for manifestation in reaction.manifestation
        if manifestation.label()
    ]

    return cds_pb2.Allergy(
        substance=_text(substance),
        reaction=_text(", ".join(dict.fromkeys(reactions))),
        severity=severity,
    )


def latest_observation(
    raw: object, path: str, codes: frozenset[str]
) -> fhir.Observation | None:
    """Return the most recent current Observation with one of `codes`."""
    found = []
    for resource_path, resource in resources_of(raw, path):
        if resource.get("resourceType") != "Observation":
            continue
        observation = _model(fhir.Observation, resource, resource_path)
        if observation.status in EXCLUDED_OBSERVATION_STATUSES:
            continue
        if set(observation.code.codes(LOINC)) & codes:
            found.append((observation.time(), resource_path, observation))
    if not found:
        return None
    found.sort(key=lambda item: item[0])

    return found[-1][2]


def egfr_value(observation: fhir.Observation) -> float | None:
    quantity = observation.valueQuantity
    if quantity is None or quantity.value is None:
        return None

    return float(quantity.value)


def weight_kg(observation: fhir.Observation) -> float | None:
    """Return a body weight in kilograms, or None for an unknown unit."""
    quantity = observation.valueQuantity
    if quantity is None or quantity.value is None:
        return None
    unit = (quantity.code or quantity.unit or "").strip()
    factor = KILOGRAMS_PER_UNIT.get(unit) or KILOGRAMS_PER_UNIT.get(
        unit.lower()
    )
    if factor is None:
        return None

    return float(quantity.value) * factor


def pregnancy_status(observation: fhir.Observation) -> bool | None:
    """Return True or False for a coded answer, None for unknown."""
    concept = observation.valueCodeableConcept
    if concept is None:
        return None
    for coding in concept.coding:
        answer = PREGNANCY_ANSWERS.get((coding.system, coding.code))
        if answer is not None:
            return answer

    return None


def check_limits(mapped: MappedReview) -> None:
    """Reject a request with more items than a review takes."""
    request = mapped.request
    violations = [
        FieldViolation(
            name,
            f"at most {MAX_ITEMS} current {name} can be screened at once, "
            f"got {len(items)}",
        )
        for name, items in (
            ("medications", request.medications),
            ("conditions", request.conditions),
            ("allergies", request.allergies),
        )
        if len(items) > MAX_ITEMS
    ]
    if violations:
        raise InvalidFhir(violations)
