"""Drug-drug interaction findings between pairs of medications."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.rules import InteractionRule
from services.cds.screening.inputs import (
    ScreenedMedication,
    make_finding,
    with_ingredients,
)

Category = cds_pb2.Finding.Category


def interaction_findings(
    medications: list[ScreenedMedication], kb: KnowledgeBase
) -> Iterator[cds_pb2.Finding]:
    """Yield one finding per rule and pair of medications it matches."""
    for rule in kb.interactions:
        objects = [
            index
            for index, medication in enumerate(medications)
            if medication.drugs & rule.object_drugs
        ]
        precipitants = [
            index
            for index, medication in enumerate(medications)
            if medication.drugs & rule.precipitant_drugs
        ]
        paired = set()
        for first in objects:
            for second in precipitants:
                pair = frozenset((first, second))
                if first == second or pair in paired:
                    continue
                a, b = medications[first], medications[second]
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
) -> cds_pb2.Finding:
    detail = f"{rule.text.detail} Mechanism: {rule.mechanism}."

    return make_finding(
        Category.DRUG_INTERACTION,
        rule.text,
        [a.subject, b.subject],
        f"{a.subject} with {b.subject}: {rule.text.summary}",
        with_ingredients(
            detail, [(a.subject, matched[0]), (b.subject, matched[1])], kb
        ),
        rule.id,
    )
