"""Drug-condition findings: a medication contraindicated or cautioned in
one of the patient's conditions."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.screening.inputs import (
    ScreenedCondition,
    ScreenedMedication,
    make_finding,
    with_ingredients,
)

Category = cds_pb2.Finding.Category


def condition_findings(
    medications: list[ScreenedMedication],
    conditions: list[ScreenedCondition],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    """Yield one finding per rule, medication and matching condition.

    A rule limited to older adults applies only when the age is given and
    at least its minimum.
    """
    age = patient.age_years if patient.HasField("age_years") else None
    for rule in kb.condition_rules:
        if rule.min_age is not None and (age is None or age < rule.min_age):
            continue
        for condition in conditions:
            if rule.condition not in condition.conditions:
                continue
            for medication in medications:
                matched = sorted(medication.drugs & rule.drugs)
                if not matched:
                    continue
                yield make_finding(
                    Category.DRUG_CONDITION,
                    rule.text,
                    [medication.subject, condition.subject],
                    f"{medication.subject} with {condition.subject}: "
                    f"{rule.text.summary}",
                    with_ingredients(
                        rule.text.detail,
                        [(medication.subject, matched[0])],
                        kb,
                    ),
                    rule.id,
                )
