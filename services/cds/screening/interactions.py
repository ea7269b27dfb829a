"""Drug-drug interaction findings between pairs of medications."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.rules import InteractionRule
from services.cds.screening.findings import (
    FindingRecord,
    make_finding,
    with_ingredients,
)
from services.cds.screening.inputs import (
    ScreenedMedication,
    ScreenedMedications,
)

DRUG_INTERACTION = cds_pb2.Finding.Category.DRUG_INTERACTION


def interaction_findings(
    medications: ScreenedMedications, kb: KnowledgeBase
) -> Iterator[FindingRecord]:
    """Yield one finding per rule and pair of medications it matches."""
    for rule in kb.index.interactions.rules_for(medications.drugs):
        objects = medications.positions_containing(rule.object_drugs)
        precipitants = medications.positions_containing(rule.precipitant_drugs)
        paired = set()
        for first in objects:
            for second in precipitants:
                pair = frozenset((first, second))
                if first == second or pair in paired:
                    continue
                a, b = medications.items[first], medications.items[second]
                matched = _matched_drugs(rule, a, b)
                if matched:
                    paired.add(pair)
                    yield _interaction_finding(rule, a, b, matched, kb)


def _matched_drugs(
    rule: InteractionRule, a: ScreenedMedication, b: ScreenedMedication
) -> tuple[str, str] | None:
    """Return the first object and precipitant drug that a and b contain.

    The two drugs must differ, so a drug listed twice under two names is
    not an interaction with itself.
    """
    for object_drug in sorted(a.drugs & rule.object_drugs):
        for precipitant in sorted(b.drugs & rule.precipitant_drugs):
            if object_drug != precipitant:
                return object_drug, precipitant

    return None


def _interaction_finding(
    rule: InteractionRule,
    a: ScreenedMedication,
    b: ScreenedMedication,
    matched: tuple[str, str],
    kb: KnowledgeBase,
) -> FindingRecord:
    detail = f"{rule.text.detail} Mechanism: {rule.mechanism}."

    return make_finding(
        DRUG_INTERACTION,
        rule.text,
        [a.subject, b.subject],
        f"{a.subject} with {b.subject}: {rule.text.summary}",
        with_ingredients(detail, [(a, matched[0]), (b, matched[1])], kb),
        rule.id,
    )
