"""Screen a clinical review request against the knowledge base.

Screening is pure and deterministic, so the same request and knowledge
base always give the same findings in the same order. The request is PHI,
so this module logs, stores and caches nothing of it.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import (
    AllergyMatch,
    AllergyRule,
    InteractionRule,
    KnowledgeBase,
    name_words,
)

Finding = cds_pb2.Finding
Risk = cds_pb2.Risk

RISK_LEVEL_OF_SEVERITY = {
    Finding.Severity.CONTRAINDICATED: Risk.Level.CRITICAL,
    Finding.Severity.MAJOR: Risk.Level.HIGH,
    Finding.Severity.MODERATE: Risk.Level.MODERATE,
}
"""Risk level for the most severe finding. Lower severities give LOW."""

RENAL_DOSING = "renal dosing"


@dataclass
class ScreeningResult:
    findings: list[cds_pb2.Finding]
    not_screened: list[cds_pb2.NotScreened]
    recommendations: list[cds_pb2.Recommendation]
    risk: cds_pb2.Risk


@dataclass(frozen=True)
class _Medication:
    # The name as the request gave it, or the RxNorm code without a name.
    subject: str
    drugs: frozenset[str]


@dataclass(frozen=True)
class _Allergy:
    substance: str
    severity: int
    match: AllergyMatch


def screen(
    request: cds_pb2.ClinicalReviewRequest, kb: KnowledgeBase
) -> ScreeningResult:
    """Screen the medications for interactions, allergies and renal cautions.

    Items and checks that could not be screened are listed, never dropped.
    """
    not_screened: list[cds_pb2.NotScreened] = []
    medications, unrecognized = _resolve_medications(
        request.medications, kb, not_screened
    )
    allergies = _resolve_allergies(request.allergies, kb, not_screened)

    findings = [
        *_interaction_findings(medications, kb),
        *_allergy_findings(medications, allergies, kb),
        *_renal_findings(medications, request.patient, kb),
    ]
    findings.sort(key=_finding_order)

    not_screened += _unavailable_checks(request, medications, kb)
    recommendations = _recommendations(findings, unrecognized)

    return ScreeningResult(
        findings=findings,
        not_screened=not_screened,
        recommendations=recommendations,
        risk=_risk(findings, len(unrecognized)),
    )


def _resolve_medications(
    requested: Sequence[cds_pb2.Medication],
    kb: KnowledgeBase,
    not_screened: list[cds_pb2.NotScreened],
) -> tuple[list[_Medication], list[str]]:
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

        not_screened += _medication_gaps(
            subject, code, bool(code_drugs), drugs, match.unrecognized, kb
        )
        if drugs:
            medications.append(_Medication(subject, drugs))
        if not drugs or match.unrecognized:
            unrecognized.append(subject)

    return medications, unrecognized


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
            _not_screened(
                subject,
                f"RxNorm code {code} is not in the knowledge base, so the "
                "medication was screened by its name",
            )
        )
    elif code and not code_known:
        gaps.append(
            _not_screened(
                subject,
                f"neither the name nor RxNorm code {code} was recognized, "
                "so the medication was not screened",
            )
        )
    elif not drugs:
        gaps.append(
            _not_screened(
                subject, "not recognized, so the medication was not screened"
            )
        )
    if drugs and unmatched_words:
        screened_as = ", ".join(sorted(kb.drugs[d].name for d in drugs))
        gaps.append(
            _not_screened(
                subject,
                f"partly recognized and screened as {screened_as}. The "
                f'words "{" ".join(unmatched_words)}" were not recognized '
                "and not screened",
            )
        )

    return gaps


def _resolve_allergies(
    requested: Sequence[cds_pb2.Allergy],
    kb: KnowledgeBase,
    not_screened: list[cds_pb2.NotScreened],
) -> list[_Allergy]:
    allergies = []
    for allergy in requested:
        match = kb.resolve_allergy(allergy.substance)
        recognized = match.allergy_classes or match.drugs
        if not recognized:
            not_screened.append(
                _not_screened(
                    allergy.substance,
                    "allergy not recognized as a drug or drug class, so it "
                    "was not screened against the medications",
                )
            )
            continue
        if match.unrecognized:
            not_screened.append(
                _not_screened(
                    allergy.substance,
                    "allergy partly recognized. The words "
                    f'"{" ".join(match.unrecognized)}" were not recognized '
                    "and not screened",
                )
            )
        allergies.append(_Allergy(allergy.substance, allergy.severity, match))

    return allergies


def _interaction_findings(
    medications: list[_Medication], kb: KnowledgeBase
) -> Iterator[cds_pb2.Finding]:
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
    rule: InteractionRule, a: _Medication, b: _Medication
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
    a: _Medication,
    b: _Medication,
    matched: tuple[str, str],
    kb: KnowledgeBase,
) -> cds_pb2.Finding:
    return Finding(
        category=Finding.Category.DRUG_INTERACTION,
        severity=rule.severity,
        subjects=[a.subject, b.subject],
        summary=f"{a.subject} with {b.subject}: {rule.summary}",
        detail=_with_ingredients(
            rule.detail, [(a.subject, matched[0]), (b.subject, matched[1])], kb
        ),
        action=rule.action,
        source=rule.source.to_proto(),
        rule_id=rule.id,
    )


def _with_ingredients(
    detail: str, matches: list[tuple[str, str]], kb: KnowledgeBase
) -> str:
    """Append which ingredient each brand or product name was matched to."""
    notes = [
        f"{subject} contains {kb.drugs[drug_id].name}."
        for subject, drug_id in matches
        if name_words(subject) != name_words(kb.drugs[drug_id].name)
    ]

    return " ".join([detail, *notes])


def _allergy_findings(
    medications: list[_Medication],
    allergies: list[_Allergy],
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
            detail = _with_ingredients(
                rule.detail, [(medication.subject, drug_id)], kb
            )
            if allergy.severity == cds_pb2.Allergy.Severity.SEVERE:
                detail += " The recorded reaction is severe."
            yield Finding(
                category=Finding.Category.DRUG_ALLERGY,
                severity=rule.severity_for(allergy.severity),
                subjects=[medication.subject, allergy.substance],
                summary=(
                    f"{medication.subject} with the recorded allergy to "
                    f"{allergy.substance}: {rule.summary}"
                ),
                detail=detail,
                action=rule.action,
                source=rule.source.to_proto(),
                rule_id=rule.id,
            )


def _allergy_rules(
    medication: _Medication, match: AllergyMatch, kb: KnowledgeBase
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


def _renal_findings(
    medications: list[_Medication],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    if not patient.HasField("egfr"):
        return
    egfr = patient.egfr
    for rule in kb.renal_rules:
        if not rule.applies(egfr):
            continue
        for medication in medications:
            matched = sorted(medication.drugs & rule.drugs)
            if not matched:
                continue
            yield Finding(
                category=Finding.Category.RENAL,
                severity=rule.severity,
                subjects=[medication.subject],
                # The rule's summary names its threshold; the patient's own
                # eGFR is not echoed back.
                summary=f"{medication.subject}: {rule.summary}",
                detail=_with_ingredients(
                    rule.detail, [(medication.subject, matched[0])], kb
                ),
                action=rule.action,
                source=rule.source.to_proto(),
                rule_id=rule.id,
            )


def _unavailable_checks(
    request: cds_pb2.ClinicalReviewRequest,
    medications: list[_Medication],
    kb: KnowledgeBase,
) -> list[cds_pb2.NotScreened]:
    """List the checks that lack their input or have no rules yet."""
    if not medications:
        return []
    patient = request.patient
    checks = []
    renal_drugs = frozenset().union(*(rule.drugs for rule in kb.renal_rules))
    if not patient.HasField("egfr") and any(
        medication.drugs & renal_drugs for medication in medications
    ):
        checks.append(_not_screened(RENAL_DOSING, "eGFR not given"))
    if request.conditions:
        checks.append(
            _not_screened(
                "drug-condition screening",
                "the knowledge base has no drug-condition rules yet, so the "
                "conditions were not screened",
            )
        )
    if patient.pregnant:
        checks.append(
            _not_screened(
                "pregnancy screening",
                "the knowledge base has no pregnancy rules yet",
            )
        )
    if patient.lactating:
        checks.append(
            _not_screened(
                "lactation screening",
                "the knowledge base has no lactation rules yet",
            )
        )
    if patient.HasField("age_years") and patient.age_years >= 65:
        checks.append(
            _not_screened(
                "age screening",
                "the knowledge base has no rules for older adults, such as "
                "the AGS Beers Criteria, yet",
            )
        )

    return checks


def _finding_order(finding: cds_pb2.Finding) -> tuple:
    return (
        -finding.severity,
        finding.category,
        finding.rule_id,
        tuple(finding.subjects),
        finding.summary,
    )


def _recommendations(
    findings: list[cds_pb2.Finding], unrecognized: list[str]
) -> list[cds_pb2.Recommendation]:
    texts = []
    for finding in findings:
        subjects = finding.subjects
        if finding.category == Finding.Category.DRUG_INTERACTION:
            texts.append(f"{subjects[0]} with {subjects[1]}: {finding.action}")
        elif finding.category == Finding.Category.DRUG_ALLERGY:
            texts.append(
                f"{subjects[0]} (recorded allergy to {subjects[1]}): "
                f"{finding.action}"
            )
        else:
            texts.append(f"{subjects[0]}: {finding.action}")
    texts += [
        f"Review {subject} by hand: the screening engine did not fully "
        "recognize it."
        for subject in unrecognized
    ]

    return [
        cds_pb2.Recommendation(
            text=text, origin=cds_pb2.Recommendation.Origin.RULES
        )
        for text in dict.fromkeys(texts)
    ]


def _risk(
    findings: list[cds_pb2.Finding], unrecognized_count: int
) -> cds_pb2.Risk:
    """Rate the risk by the most severe finding and list what drove it."""
    factors = []
    level = Risk.Level.LOW
    if findings:
        top = findings[0].severity
        level = RISK_LEVEL_OF_SEVERITY.get(top, Risk.Level.LOW)
        factors = [f.summary for f in findings if f.severity == top]
    if unrecognized_count:
        factors.append(
            f"{unrecognized_count} medication(s) not fully recognized, so "
            "the risk may be underestimated"
        )

    return Risk(level=level, factors=list(dict.fromkeys(factors)))


def _not_screened(subject: str, reason: str) -> cds_pb2.NotScreened:
    return cds_pb2.NotScreened(subject=subject, reason=reason)
