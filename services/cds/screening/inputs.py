"""Resolve a request's medications, allergies and conditions to the
knowledge base's drugs and conditions.

Whatever cannot be resolved is reported as not screened, with the reason;
nothing is dropped silently and nothing is matched approximately.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import AllergyMatch, KnowledgeBase
from services.cds.vocabulary import name_words


@dataclass(frozen=True)
class ScreenedMedication:
    """A recognized medication and the request item it came from."""

    # The name as the request gave it, or the RxNorm code without a name.
    subject: str
    drugs: frozenset[str]
    item: cds_pb2.Medication
    # The subject's name words, to tell a brand name from the ingredient.
    words: tuple[str, ...]


class ScreenedMedications:
    """The screened medications in request order, indexed by drug."""

    def __init__(self, items: list[ScreenedMedication]) -> None:
        self.items = items
        positions: dict[str, list[int]] = {}
        for position, medication in enumerate(items):
            for drug_id in medication.drugs:
                positions.setdefault(drug_id, []).append(position)
        # Drug id to the positions of the medications that contain it.
        self.positions_by_drug = {
            drug_id: tuple(found) for drug_id, found in positions.items()
        }
        self.drugs = frozenset(positions)

    def positions_containing(self, drugs: frozenset[str]) -> tuple[int, ...]:
        """Return the positions of the medications with any of `drugs`."""
        common = drugs & self.drugs
        if len(common) == 1:
            return self.positions_by_drug[next(iter(common))]

        return tuple(
            sorted(
                {
                    position
                    for drug_id in common
                    for position in self.positions_by_drug[drug_id]
                }
            )
        )

    def containing(self, drugs: frozenset[str]) -> list[ScreenedMedication]:
        """Return the medications with any of `drugs`, in request order."""
        return [self.items[p] for p in self.positions_containing(drugs)]


@dataclass(frozen=True)
class ScreenedAllergy:
    substance: str
    severity: int
    match: AllergyMatch


@dataclass(frozen=True)
class ScreenedCondition:
    # The name as the request gave it, or its code without a name.
    subject: str
    conditions: frozenset[str]


def not_screened(subject: str, reason: str) -> cds_pb2.NotScreened:
    return cds_pb2.NotScreened(subject=subject, reason=reason)


def resolve_medications(
    requested: Sequence[cds_pb2.Medication],
    kb: KnowledgeBase,
    gaps: list[cds_pb2.NotScreened],
) -> tuple[list[ScreenedMedication], list[str]]:
    """Return the recognized medications and the subjects of the others.

    A medication is screened for the drugs of its RxNorm code and of its
    name together, so either one is enough to screen it.
    """
    medications = []
    unrecognized = []
    for medication in requested:
        subject = medication.name
        if not subject.strip():
            subject = medication.rxnorm
        match = kb.resolve_name(medication.name)
        code = medication.rxnorm.strip()
        code_drugs = kb.resolve_rxnorm(code) if code else ()
        drugs = frozenset(match.drugs) | frozenset(code_drugs)

        gaps += _medication_gaps(
            subject, code, bool(code_drugs), drugs, match.unrecognized, kb
        )
        gaps += _code_conflict(subject, code, match.drugs, code_drugs, kb)
        if drugs:
            medications.append(
                ScreenedMedication(
                    subject, drugs, medication, name_words(subject)
                )
            )
        if not drugs or match.unrecognized:
            unrecognized.append(subject)

    return medications, unrecognized


def _code_conflict(
    subject: str,
    code: str,
    name_drugs,
    code_drugs,
    kb: KnowledgeBase,
) -> list[cds_pb2.NotScreened]:
    """Flag an RxNorm code that names other drugs than the name does.

    Both are screened, so no finding is lost, but the order is ambiguous.
    """
    other = sorted(set(code_drugs) - set(name_drugs))
    if not name_drugs or not other:
        return []
    names = ", ".join(kb.drugs[drug_id].name for drug_id in other)

    return [
        not_screened(
            subject,
            f"RxNorm code {code} names {names}, which the name does not: "
            "both were screened; check which drug was meant",
        )
    ]


def _medication_gaps(
    subject: str,
    code: str,
    code_known: bool,
    drugs: frozenset[str],
    unmatched_words: tuple[str, ...],
    kb: KnowledgeBase,
) -> list[cds_pb2.NotScreened]:
    """Explain what of one medication could not be screened."""
    gaps = []
    if code and not code_known and drugs:
        gaps.append(
            not_screened(
                subject,
                f"RxNorm code {code} is not in the knowledge base, so the "
                "medication was screened by its name",
            )
        )
    elif code and not code_known:
        gaps.append(
            not_screened(
                subject,
                f"neither the name nor RxNorm code {code} was recognized, "
                "so the medication was not screened",
            )
        )
    elif not drugs:
        gaps.append(
            not_screened(
                subject, "not recognized, so the medication was not screened"
            )
        )
    if drugs and unmatched_words:
        screened_as = ", ".join(sorted(kb.drugs[d].name for d in drugs))
        gaps.append(
            not_screened(
                subject,
                f"partly recognized and screened as {screened_as}. The "
                f'words "{" ".join(unmatched_words)}" were not recognized '
                "and not screened",
            )
        )

    return gaps


def resolve_allergies(
    requested: Sequence[cds_pb2.Allergy],
    kb: KnowledgeBase,
    gaps: list[cds_pb2.NotScreened],
) -> list[ScreenedAllergy]:
    allergies = []
    for allergy in requested:
        match = kb.resolve_allergy(allergy.substance)
        recognized = match.allergy_classes or match.drugs
        if not recognized:
            gaps.append(
                not_screened(
                    allergy.substance,
                    "allergy not recognized as a drug or drug class, so it "
                    "was not screened against the medications",
                )
            )
            continue
        if match.unrecognized:
            gaps.append(
                not_screened(
                    allergy.substance,
                    "allergy partly recognized. The words "
                    f'"{" ".join(match.unrecognized)}" were not recognized '
                    "and not screened",
                )
            )
        allergies.append(
            ScreenedAllergy(allergy.substance, allergy.severity, match)
        )

    return allergies


def resolve_conditions(
    requested: Sequence[cds_pb2.Condition],
    kb: KnowledgeBase,
    gaps: list[cds_pb2.NotScreened],
) -> list[ScreenedCondition]:
    """Return the recognized conditions; report the others.

    A condition none of whose codes or name the knowledge base knows is
    not screened. A known condition with an unknown code is screened, and
    the unknown code is reported.
    """
    conditions = []
    for condition in requested:
        subject = condition.name
        if not subject.strip():
            subject = condition.icd10.strip() or condition.snomed.strip()
        match = kb.resolve_condition(
            condition.name, condition.icd10, condition.snomed
        )
        if not match.conditions:
            gaps.append(
                not_screened(
                    subject,
                    "condition not recognized by name or code, so it was "
                    "not screened against the medications",
                )
            )
            continue
        unknown = [
            f"{system} code {code.strip()}"
            for system, code, is_unknown in (
                ("ICD-10", condition.icd10, match.unknown_icd10),
                ("SNOMED CT", condition.snomed, match.unknown_snomed),
            )
            if is_unknown
        ]
        if unknown:
            gaps.append(
                not_screened(
                    subject,
                    f"{' and '.join(unknown)} not in the knowledge base, so "
                    "the condition was screened by its other identifiers",
                )
            )
        conditions.append(
            ScreenedCondition(subject, frozenset(match.conditions))
        )

    return conditions
