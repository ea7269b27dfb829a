"""Properties every screening result keeps, on seeded random requests.

The requests are built from the knowledge base's own names, brands, codes
and dose limits, mixed with unknown words, units, routes and frequencies
and repeated items. Whatever the request, the result is deterministic,
cites a rule for every finding, repeats nothing, and lists every
medication it could not recognize.
"""

import random

import pytest
from arxio.cds.v1 import cds_pb2
from google.protobuf import text_format

from services.cds import dosing
from services.cds.evaluate import DEFAULT_CASES, load_cases
from services.cds.knowledge_base import KnowledgeBase, load_knowledge_base
from services.cds.screening import ScreeningResult, screen

KB = load_knowledge_base()
Sex = cds_pb2.Patient.Sex
AllergySeverity = cds_pb2.Allergy.Severity

# Every rule a finding may cite.
RULE_IDS = frozenset(
    [
        *(
            rule.id
            for rules in (
                KB.interactions,
                KB.allergy_classes,
                KB.cross_reactivities,
                KB.renal_rules,
                KB.condition_rules,
                KB.age_rules,
                KB.pregnancy_rules,
                KB.lactation_rules,
                KB.duplicate_rules,
                KB.dose_limits,
            )
            for rule in rules
        ),
        KB.same_drug_allergy.id,
        KB.same_ingredient_rule_id,
    ]
)
RANDOM_REQUESTS = 300
SEED = 20261204
UNITS = ["mg", "g", "mcg", "ng", "units", "IU", "mEq", "mmol", "puffs", ""]
ROUTES = sorted(dosing.ROUTE_SYNONYMS) + ["", "intrathecal", "ORAL"]
FREQUENCIES = [
    "",
    "daily",
    "bid",
    "twice daily",
    "tid",
    "qid",
    "every 4 hours",
    "every 6 hours",
    "q8h",
    "every 12 hours",
    "weekly",
    "once weekly",
    "every other day",
    "monthly",
    "once",
    "as needed",
    "every 6 hours as needed",
    "whenever",
]
# Words the knowledge base does not know, for partly and wholly
# unrecognized items.
UNKNOWN_WORDS = ["zorblatin", "unknownium", "herbal tea", "xq-17"]
UNKNOWN_CODES = ["9999999", "Z99.89", "A00.0", "R69", "123"]


def describe(result: ScreeningResult) -> dict[str, list[str]]:
    """Render every field of a result as text, one line per message."""

    def lines(messages) -> list[str]:
        return [
            text_format.MessageToString(message, as_one_line=True)
            for message in messages
        ]

    return {
        "findings": lines(result.findings),
        "not_screened": lines(result.not_screened),
        "recommendations": lines(result.recommendations),
        "risk": lines([result.risk]),
    }


def assert_result_properties(request: cds_pb2.ClinicalReviewRequest) -> None:
    result = screen(request, KB)
    again = describe(screen(request, KB))
    rule_ids = RULE_IDS

    assert describe(result) == again
    assert len(again["findings"]) == len(set(again["findings"]))
    for finding in result.findings:
        assert finding.rule_id in rule_ids, finding.rule_id
        assert finding.source.citation, finding.rule_id
        assert finding.severity, finding.rule_id
    reported = {gap.subject for gap in result.not_screened}
    for medication in request.medications:
        subject = medication.name or medication.rxnorm
        recognized = KB.resolve_name(medication.name).drugs or (
            medication.rxnorm and KB.resolve_rxnorm(medication.rxnorm)
        )
        if not recognized:
            assert subject in reported, subject


class KnowledgeNames:
    """Names and codes of the knowledge base to build requests from."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb
        self.drug_ids = sorted(kb.drugs)
        self.medication_names = sorted(" ".join(w) for w in kb.names)
        self.drug_codes = sorted(kb.rxnorm_codes)
        self.allergy_terms = sorted(" ".join(w) for w in kb.allergy_terms)
        self.allergy_class_names = [c.name for c in kb.allergy_classes]
        conditions = sorted(kb.conditions.values(), key=lambda c: c.id)
        self.condition_terms = [t for c in conditions for t in c.terms]
        self.icd10_prefixes = [p for c in conditions for p in c.icd10_prefixes]
        self.snomed_codes = [s for c in conditions for s in c.snomed_codes]
        self.limits_by_drug: dict[str, list] = {}
        for limit in kb.dose_limits:
            self.limits_by_drug.setdefault(limit.drug, []).append(limit)


def random_dose(rng: random.Random, drug_id: str, words: KnowledgeNames):
    """Return a dose near one of the drug's limits, or an arbitrary one."""
    limits = words.limits_by_drug.get(drug_id)
    if limits and rng.random() < 0.8:
        limit = rng.choice(limits)
        factor = rng.choice([0.1, 0.25, 0.5, 1, 1.01, 2, 7, 20])
        unit = limit.max_daily.unit
        if rng.random() < 0.2:
            unit = rng.choice(UNITS)

        return cds_pb2.Dose(value=limit.max_daily.value * factor, unit=unit)

    return cds_pb2.Dose(
        value=rng.choice([0, 0.5, 5, 10, 250, 1000]), unit=rng.choice(UNITS)
    )


def random_medication(
    rng: random.Random, words: KnowledgeNames
) -> cds_pb2.Medication:
    drug_id = rng.choice(words.drug_ids)
    kind = rng.random()
    if kind < 0.5:
        name = words.kb.drugs[drug_id].name
    elif kind < 0.8:
        name = rng.choice(words.medication_names)
    elif kind < 0.9:
        name = f"{rng.choice(words.medication_names)} 50 mg tablet ER"
    elif kind < 0.95:
        name = f"{words.kb.drugs[drug_id].name} {rng.choice(UNKNOWN_WORDS)}"
    else:
        name = rng.choice(UNKNOWN_WORDS)
    medication = cds_pb2.Medication(name=name)
    if rng.random() < 0.3:
        medication.rxnorm = rng.choice([*words.drug_codes, *UNKNOWN_CODES])
        if rng.random() < 0.3:
            medication.name = ""
    if rng.random() < 0.7:
        medication.dose.CopyFrom(random_dose(rng, drug_id, words))
        medication.route = rng.choice(ROUTES)
        medication.frequency = rng.choice(FREQUENCIES)

    return medication


def random_allergy(
    rng: random.Random, words: KnowledgeNames
) -> cds_pb2.Allergy:
    kind = rng.random()
    if kind < 0.3:
        substance = rng.choice(words.allergy_terms)
    elif kind < 0.4:
        substance = rng.choice(words.allergy_class_names)
    elif kind < 0.85:
        substance = rng.choice(words.medication_names)
    elif kind < 0.95:
        substance = f"{rng.choice(words.medication_names)} hives"
    else:
        substance = rng.choice(UNKNOWN_WORDS)

    return cds_pb2.Allergy(
        substance=substance,
        severity=rng.choice(list(AllergySeverity.values())),
    )


def random_condition(
    rng: random.Random, words: KnowledgeNames
) -> cds_pb2.Condition:
    condition = cds_pb2.Condition()
    if rng.random() < 0.6:
        condition.name = rng.choice([*words.condition_terms, *UNKNOWN_WORDS])
    if rng.random() < 0.4:
        prefix = rng.choice(words.icd10_prefixes)
        suffix = rng.choice(["", ".9", "1", ".22", "X"])
        condition.icd10 = rng.choice(
            [prefix + suffix, prefix.lower(), *UNKNOWN_CODES]
        )
    if rng.random() < 0.3:
        condition.snomed = rng.choice([*words.snomed_codes, *UNKNOWN_CODES])
    if not (condition.name or condition.icd10 or condition.snomed):
        condition.name = rng.choice(words.condition_terms)

    return condition


def random_patient(rng: random.Random) -> cds_pb2.Patient:
    patient = cds_pb2.Patient(sex=rng.choice(list(Sex.values())))
    if rng.random() < 0.8:
        patient.age_years = rng.choice([0, 1, 5, 12, 17, 18, 40, 64, 65, 90])
    if rng.random() < 0.7:
        patient.egfr = rng.choice([5, 14.9, 15, 29, 30, 45, 59, 60, 90, 120])
    if rng.random() < 0.6:
        patient.weight_kg = rng.choice([3, 20, 45, 70, 120])
    if rng.random() < 0.4:
        patient.pregnant = rng.random() < 0.5
    if rng.random() < 0.4:
        patient.lactating = rng.random() < 0.5

    return patient


def random_request(
    rng: random.Random, words: KnowledgeNames
) -> cds_pb2.ClinicalReviewRequest:
    """Build a request of up to 50 of each item, some listed twice."""
    request = cds_pb2.ClinicalReviewRequest(patient=random_patient(rng))
    medications = [
        random_medication(rng, words) for _ in range(rng.randint(0, 50))
    ]
    allergies = [random_allergy(rng, words) for _ in range(rng.randint(0, 50))]
    conditions = [
        random_condition(rng, words) for _ in range(rng.randint(0, 50))
    ]
    # A repeated item must give its findings once, as before.
    for items in (medications, allergies, conditions):
        if items and rng.random() < 0.3:
            items.append(rng.choice(items))
    request.medications.extend(medications)
    request.allergies.extend(allergies)
    request.conditions.extend(conditions)

    return request


def random_requests() -> list[cds_pb2.ClinicalReviewRequest]:
    rng = random.Random(SEED)
    words = KnowledgeNames(KB)

    return [random_request(rng, words) for _ in range(RANDOM_REQUESTS)]


CASES = load_cases(DEFAULT_CASES)


@pytest.fixture(scope="module")
def random_batch() -> list[cds_pb2.ClinicalReviewRequest]:
    return random_requests()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_evaluation_case_properties(case):
    assert_result_properties(case.request)


@pytest.mark.parametrize(
    "request_number", range(RANDOM_REQUESTS), ids=lambda n: f"random-{n}"
)
def test_random_request_properties(request_number, random_batch):
    assert_result_properties(random_batch[request_number])


def test_random_requests_raise_findings(random_batch):
    """The random requests raise every category and not-screened items.

    Properties prove little of requests that raise nothing.
    """
    categories = set()
    gaps = 0
    for request in random_batch:
        result = screen(request, KB)
        categories |= {finding.category for finding in result.findings}
        gaps += len(result.not_screened)

    expected = set(cds_pb2.Finding.Category.values()) - {
        cds_pb2.Finding.Category.CATEGORY_UNSPECIFIED
    }

    assert set() == expected - categories
    assert gaps > 0
