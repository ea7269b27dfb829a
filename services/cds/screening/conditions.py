"""Drug-condition findings: a medication contraindicated or cautioned in
one of the patient's conditions."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.screening.findings import (
    FindingRecord,
    make_finding,
    with_ingredients,
)
from services.cds.screening.inputs import (
    ScreenedCondition,
    ScreenedMedications,
)

DRUG_CONDITION = cds_pb2.Finding.Category.DRUG_CONDITION


def condition_findings(
    medications: ScreenedMedications,
    conditions: list[ScreenedCondition],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> Iterator[FindingRecord]:
    """Yield one finding per rule, medication and matching condition.

    A rule limited to older adults applies only when the age is given and
    at least its minimum.
    """
    age = patient.age_years if patient.HasField("age_years") else None
    by_drug = kb.index.condition_rules_by_drug
    by_condition = kb.index.condition_rules_by_condition
    condition_ids = {
        condition_id
        for condition in conditions
        for condition_id in condition.conditions
    }
    positions = by_drug.positions_for(medications.drugs)
    positions &= by_condition.positions_for(condition_ids)
    for rule in by_drug.rules_at(positions):
        if rule.min_age is not None and (age is None or age < rule.min_age):
            continue
        matching = medications.containing(rule.drugs)
        for condition in conditions:
            if rule.condition not in condition.conditions:
                continue
            for medication in matching:
                matched = sorted(medication.drugs & rule.drugs)
                yield make_finding(
                    DRUG_CONDITION,
                    rule.text,
                    [medication.subject, condition.subject],
                    f"{medication.subject} with {condition.subject}: "
                    f"{rule.text.summary}",
                    with_ingredients(
                        rule.text.detail, [(medication, matched[0])], kb
                    ),
                    rule.id,
                )
