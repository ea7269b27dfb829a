"""Drug-allergy findings, including cross-sensitivity between classes."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import AllergyMatch, KnowledgeBase
from services.cds.rules import AllergyRule
from services.cds.screening.findings import (
    FindingRecord,
    make_finding,
    with_ingredients,
)
from services.cds.screening.inputs import (
    ScreenedAllergy,
    ScreenedMedications,
)

DRUG_ALLERGY = cds_pb2.Finding.Category.DRUG_ALLERGY
SEVERE = cds_pb2.Allergy.Severity.SEVERE


def allergy_findings(
    medications: ScreenedMedications,
    allergies: list[ScreenedAllergy],
    kb: KnowledgeBase,
) -> Iterator[FindingRecord]:
    """Yield at most one finding per medication and allergy.

    Of the rules that apply, the most severe wins. At equal severity an
    allergy to the drug itself wins over its class, and the class over a
    cross-reactive class. Findings come by medication, then by allergy,
    in request order.
    """
    rules_by_allergy = [
        _allergy_rules(allergy.match, kb) for allergy in allergies
    ]
    # Only a medication that contains a drug one of the allergy's rules
    # covers can match it, so other pairs are never checked.
    pairs = sorted(
        (position, number)
        for number, rules in enumerate(rules_by_allergy)
        for position in medications.positions_containing(
            frozenset().union(*(members for _, members in rules))
        )
    )
    for position, number in pairs:
        medication = medications.items[position]
        allergy = allergies[number]
        applicable = [
            (rule, min(medication.drugs & members))
            for rule, members in rules_by_allergy[number]
            if medication.drugs & members
        ]
        rule, drug_id = max(
            applicable,
            key=lambda candidate: candidate[0].severity_for(allergy.severity),
        )
        detail = with_ingredients(
            rule.text.detail, [(medication, drug_id)], kb
        )
        if allergy.severity == SEVERE:
            detail += " The recorded reaction is severe."
        yield make_finding(
            DRUG_ALLERGY,
            rule.text,
            [medication.subject, allergy.substance],
            f"{medication.subject} with the recorded allergy to "
            f"{allergy.substance}: {rule.text.summary}",
            detail,
            rule.id,
            severity=rule.severity_for(allergy.severity),
        )


def _allergy_rules(
    match: AllergyMatch, kb: KnowledgeBase
) -> list[tuple[AllergyRule, frozenset[str]]]:
    """Return each rule of a recorded allergy with the drugs it covers.

    The order is the most specific first: the allergy drug itself, then its
    class, then a cross-reactive class.
    """
    return [
        (kb.same_drug_allergy, frozenset(match.drugs)),
        *(
            (allergy_class, allergy_class.members)
            for allergy_class in kb.allergy_classes
            if allergy_class.id in match.allergy_classes
        ),
        *(
            (cross, cross.members)
            for cross in kb.cross_reactivities
            if cross.allergy_class in match.allergy_classes
        ),
    ]
