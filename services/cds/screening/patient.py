"""Findings that depend on the patient: age, pregnancy, lactation and
kidney function, and the report of those checks that lack their input.

Finding texts name the rule's thresholds, never the patient's own values,
so a response echoes no demographics.
"""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.rules import FindingText
from services.cds.screening.findings import (
    FindingRecord,
    make_finding,
    with_ingredients,
)
from services.cds.screening.inputs import ScreenedMedications, not_screened

Category = cds_pb2.Finding.Category
Sex = cds_pb2.Patient.Sex

# Ages at which pregnancy and lactation are screened when their status is
# not given, as a bound on when to report the missing status.
CHILDBEARING_AGES = range(10, 56)


def _drug_findings(
    category: int,
    rule_id: str,
    text: FindingText,
    drugs: frozenset[str],
    medications: ScreenedMedications,
    kb: KnowledgeBase,
) -> Iterator[FindingRecord]:
    for medication in medications.containing(drugs):
        matched = sorted(medication.drugs & drugs)
        yield make_finding(
            category,
            text,
            [medication.subject],
            f"{medication.subject}: {text.summary}",
            with_ingredients(text.detail, [(medication, matched[0])], kb),
            rule_id,
        )


def patient_findings(
    medications: ScreenedMedications,
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> Iterator[FindingRecord]:
    """Yield the age, pregnancy, lactation and renal findings."""
    index = kb.index
    drugs = medications.drugs
    rules: list[tuple[int, object]] = []
    if patient.HasField("age_years"):
        rules += [
            (Category.AGE, rule)
            for rule in index.age_rules.rules_for(drugs)
            if rule.applies(patient.age_years)
        ]
    if patient.pregnant:
        rules += [
            (Category.PREGNANCY, rule)
            for rule in index.pregnancy_rules.rules_for(drugs)
        ]
    if patient.lactating:
        rules += [
            (Category.PREGNANCY, rule)
            for rule in index.lactation_rules.rules_for(drugs)
        ]
    if patient.HasField("egfr"):
        rules += [
            (Category.RENAL, rule)
            for rule in index.renal_rules.rules_for(drugs)
            if rule.applies(patient.egfr)
        ]
    for category, rule in rules:
        yield from _drug_findings(
            category, rule.id, rule.text, rule.drugs, medications, kb
        )


def _could_be_pregnant(patient: cds_pb2.Patient) -> bool:
    if patient.sex == Sex.MALE:
        return False

    return (
        not patient.HasField("age_years")
        or patient.age_years in CHILDBEARING_AGES
    )


def missing_patient_inputs(
    medications: ScreenedMedications,
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> list[cds_pb2.NotScreened]:
    """List the patient checks that apply to a medication but lack input."""
    index = kb.index
    drugs = medications.drugs
    gaps = []
    if not patient.HasField("egfr") and index.renal_rules.covers_any(drugs):
        gaps.append(not_screened("renal dosing", "eGFR not given"))
    if not patient.HasField("age_years") and (
        index.age_rules.covers_any(drugs)
    ):
        gaps.append(not_screened("age screening", "age not given"))
    if _could_be_pregnant(patient):
        if not patient.HasField("pregnant") and (
            index.pregnancy_rules.covers_any(drugs)
        ):
            gaps.append(
                not_screened(
                    "pregnancy screening", "pregnancy status not given"
                )
            )
        if not patient.HasField("lactating") and (
            index.lactation_rules.covers_any(drugs)
        ):
            gaps.append(
                not_screened(
                    "lactation screening", "lactation status not given"
                )
            )

    return gaps
