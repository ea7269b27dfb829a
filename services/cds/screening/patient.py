"""Findings that depend on the patient: age, pregnancy, lactation and
kidney function, and the report of those checks that lack their input.

Finding texts name the rule's thresholds, never the patient's own values,
so a response echoes no demographics.
"""

from collections.abc import Iterable, Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.rules import FindingText
from services.cds.screening.inputs import (
    ScreenedMedication,
    make_finding,
    not_screened,
    with_ingredients,
)

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
    medications: list[ScreenedMedication],
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    for medication in medications:
        matched = sorted(medication.drugs & drugs)
        if not matched:
            continue
        yield make_finding(
            category,
            text,
            [medication.subject],
            f"{medication.subject}: {text.summary}",
            with_ingredients(
                text.detail, [(medication.subject, matched[0])], kb
            ),
            rule_id,
        )


def patient_findings(
    medications: list[ScreenedMedication],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    """Yield the age, pregnancy, lactation and renal findings."""
    rules: list[tuple[int, object]] = []
    if patient.HasField("age_years"):
        rules += [
            (Category.AGE, rule)
            for rule in kb.age_rules
            if rule.applies(patient.age_years)
        ]
    if patient.pregnant:
        rules += [(Category.PREGNANCY, rule) for rule in kb.pregnancy_rules]
    if patient.lactating:
        rules += [(Category.PREGNANCY, rule) for rule in kb.lactation_rules]
    if patient.HasField("egfr"):
        rules += [
            (Category.RENAL, rule)
            for rule in kb.renal_rules
            if rule.applies(patient.egfr)
        ]
    for category, rule in rules:
        yield from _drug_findings(
            category, rule.id, rule.text, rule.drugs, medications, kb
        )


def _any_covered(
    medications: list[ScreenedMedication], rules: Iterable
) -> bool:
    covered = frozenset().union(*(rule.drugs for rule in rules))

    return any(medication.drugs & covered for medication in medications)


def _could_be_pregnant(patient: cds_pb2.Patient) -> bool:
    if patient.sex == Sex.MALE:
        return False

    return (
        not patient.HasField("age_years")
        or patient.age_years in CHILDBEARING_AGES
    )


def missing_patient_inputs(
    medications: list[ScreenedMedication],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> list[cds_pb2.NotScreened]:
    """List the patient checks that apply to a medication but lack input."""
    gaps = []
    if not patient.HasField("egfr") and _any_covered(
        medications, kb.renal_rules
    ):
        gaps.append(not_screened("renal dosing", "eGFR not given"))
    if not patient.HasField("age_years") and _any_covered(
        medications, kb.age_rules
    ):
        gaps.append(not_screened("age screening", "age not given"))
    if _could_be_pregnant(patient):
        if not patient.HasField("pregnant") and _any_covered(
            medications, kb.pregnancy_rules
        ):
            gaps.append(
                not_screened(
                    "pregnancy screening", "pregnancy status not given"
                )
            )
        if not patient.HasField("lactating") and _any_covered(
            medications, kb.lactation_rules
        ):
            gaps.append(
                not_screened(
                    "lactation screening", "lactation status not given"
                )
            )

    return gaps
