"""Drug-allergy findings, including cross-sensitivity between classes."""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import AllergyMatch, KnowledgeBase
from services.cds.rules import AllergyRule
from services.cds.screening.inputs import (
    ScreenedAllergy,
    ScreenedMedication,
    make_finding,
    with_ingredients,
)

Category = cds_pb2.Finding.Category


def allergy_findings(
    medications: list[ScreenedMedication],
    allergies: list[ScreenedAllergy],
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    """Yield at most one finding per medication and allergy.

    Of the rules that apply, the most severe wins. At equal severity an
    allergy to the drug itself wins over its class, and the class over a
    cross-reactive class.
    """
    for medication in medications:
        for allergy in allergies:
            applicable = _allergy_rules(medication, allergy.match, kb)
            if not applicable:
                continue
            rule, drug_id = max(
                applicable,
                key=lambda candidate: candidate[0].severity_for(
                    allergy.severity
                ),
            )
            detail = with_ingredients(
                rule.text.detail, [(medication.subject, drug_id)], kb
            )
            if allergy.severity == cds_pb2.Allergy.Severity.SEVERE:
                detail += " The recorded reaction is severe."
            yield make_finding(
                Category.DRUG_ALLERGY,
                rule.text,
                [medication.subject, allergy.substance],
                f"{medication.subject} with the recorded allergy to "
                f"{allergy.substance}: {rule.text.summary}",
                detail,
                rule.id,
                severity=rule.severity_for(allergy.severity),
            )


def _allergy_rules(
    medication: ScreenedMedication, match: AllergyMatch, kb: KnowledgeBase
) -> list[tuple[AllergyRule, str]]:
    """Return each applicable rule with the drug it matched.

    The order is the most specific first: the allergy drug itself, then its
    class, then a cross-reactive class.
    """
    candidates = [
        (rule, min(medication.drugs & members))
        for rule, members in [
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
        if medication.drugs & members
    ]

    return candidates
