"""Duplicate therapy: one ingredient in two medications, or two
medications of one therapeutic class."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.screening.findings import FindingRecord, make_finding
from services.cds.screening.inputs import ScreenedMedications

DUPLICATE_THERAPY = cds_pb2.Finding.Category.DUPLICATE_THERAPY


def duplicate_findings(
    medications: ScreenedMedications, kb: KnowledgeBase
) -> Iterator[FindingRecord]:
    """Yield a finding per shared ingredient, then per shared class.

    Medications that share an ingredient are not also reported as a class
    duplicate for that ingredient's classes alone.
    """
    text = kb.same_ingredient
    for drug_id, positions in sorted(medications.positions_by_drug.items()):
        if len(positions) < 2:
            continue
        subjects = [medications.items[p].subject for p in positions]
        name = kb.drugs[drug_id].name
        yield make_finding(
            DUPLICATE_THERAPY,
            text,
            subjects,
            f"{', '.join(subjects)}: {text.summary} ({name})",
            f"{text.detail} Each of these contains {name}.",
            kb.same_ingredient_rule_id,
        )

    for rule in kb.index.duplicate_rules.rules_for(medications.drugs):
        members = [
            (medication, sorted(medication.drugs & rule.members))
            for medication in medications.containing(rule.members)
        ]
        distinct = {tuple(drugs) for _, drugs in members}
        if len(members) < 2 or len(distinct) < 2:
            continue
        subjects = [medication.subject for medication, _ in members]
        class_name = kb.classes[rule.drug_class].name
        yield make_finding(
            DUPLICATE_THERAPY,
            rule.text,
            subjects,
            f"{', '.join(subjects)}: {rule.text.summary}",
            f"{rule.text.detail} Each of these is a {class_name}.",
            rule.id,
        )
