"""Duplicate therapy: one ingredient in two medications, or two
medications of one therapeutic class."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.screening.inputs import ScreenedMedication, make_finding

Category = cds_pb2.Finding.Category


def duplicate_findings(
    medications: list[ScreenedMedication], kb: KnowledgeBase
) -> Iterator[cds_pb2.Finding]:
    """Yield a finding per shared ingredient, then per shared class.

    Medications that share an ingredient are not also reported as a class
    duplicate for that ingredient's classes alone.
    """
    by_drug: dict[str, list[str]] = {}
    for medication in medications:
        for drug_id in medication.drugs:
            by_drug.setdefault(drug_id, []).append(medication.subject)
    shared = {
        drug_id: subjects
        for drug_id, subjects in sorted(by_drug.items())
        if len(subjects) > 1
    }
    text = kb.same_ingredient
    for drug_id, subjects in shared.items():
        name = kb.drugs[drug_id].name
        yield make_finding(
            Category.DUPLICATE_THERAPY,
            text,
            subjects,
            f"{', '.join(subjects)}: {text.summary} ({name})",
            f"{text.detail} Each of these contains {name}.",
            kb.same_ingredient_rule_id,
        )

    for rule in kb.duplicate_rules:
        members = [
            (medication, sorted(medication.drugs & rule.members))
            for medication in medications
            if medication.drugs & rule.members
        ]
        distinct = {tuple(drugs) for _, drugs in members}
        if len(members) < 2 or len(distinct) < 2:
            continue
        subjects = [medication.subject for medication, _ in members]
        class_name = kb.classes[rule.drug_class].name
        yield make_finding(
            Category.DUPLICATE_THERAPY,
            rule.text,
            subjects,
            f"{', '.join(subjects)}: {rule.text.summary}",
            f"{rule.text.detail} Each of these is a {class_name}.",
            rule.id,
        )
