"""The screening engine as it was before its rules were indexed.

`test_screening_equivalence` screens the same requests with this copy
and with `services.cds.screening.screen` and requires identical results,
so the indexes and the cheaper finding construction change the engine's
speed and nothing else. The copy tests every rule against every
medication, allergy and condition, which is slow but plainly correct.
Only the tests import it.

A copy serves better than recorded outputs: the knowledge base's wording
and citations keep changing, and outputs recorded again with the new
engine after each change would prove nothing.

Each section below copies the module named in its heading comment,
changed only in its imports and in calling the functions of this file.
It still shares the code that indexing did not touch: name, RxNorm and
allergy resolution on `KnowledgeBase`, `scan_phrases` and `dosing`. When
the engine's results are meant to change, change this copy in the same
commit, so that the difference is reviewed.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from arxio.cds.v1 import cds_pb2

from services.cds import dosing
from services.cds.knowledge_base import (
    AllergyMatch,
    ConditionMatch,
    KnowledgeBase,
)
from services.cds.rules import (
    AllergyRule,
    Amount,
    Condition,
    DoseLimit,
    FindingText,
    InteractionRule,
    normalize_icd10,
)
from services.cds.screening import ScreeningResult
from services.cds.vocabulary import name_words, scan_phrases

Finding = cds_pb2.Finding
Category = Finding.Category
Risk = cds_pb2.Risk
Sex = cds_pb2.Patient.Sex


# Copied from services/cds/screening/outcome.py.

RISK_LEVEL_OF_SEVERITY = {
    Finding.Severity.CONTRAINDICATED: Risk.Level.CRITICAL,
    Finding.Severity.MAJOR: Risk.Level.HIGH,
    Finding.Severity.MODERATE: Risk.Level.MODERATE,
}
"""Risk level for the most severe finding. Lower severities give LOW."""


def finding_order(finding: cds_pb2.Finding) -> tuple:
    """Sort key: most severe first, then a stable order of the rest."""
    return (
        -finding.severity,
        finding.category,
        finding.rule_id,
        tuple(finding.subjects),
        finding.summary,
    )


def _recommendation_text(finding: cds_pb2.Finding) -> str:
    subjects = finding.subjects
    if finding.category == Category.DRUG_INTERACTION:
        return f"{subjects[0]} with {subjects[1]}: {finding.action}"
    if finding.category == Category.DRUG_ALLERGY:
        return (
            f"{subjects[0]} (recorded allergy to {subjects[1]}): "
            f"{finding.action}"
        )
    if finding.category == Category.DRUG_CONDITION:
        return f"{subjects[0]} ({subjects[1]}): {finding.action}"
    if finding.category == Category.DUPLICATE_THERAPY:
        return f"{', '.join(subjects)}: {finding.action}"

    return f"{subjects[0]}: {finding.action}"


def recommendations(
    findings: list[cds_pb2.Finding], unrecognized: list[str]
) -> list[cds_pb2.Recommendation]:
    """Return one recommendation per finding's action, then per unknown."""
    texts = [_recommendation_text(finding) for finding in findings]
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


def risk(
    findings: list[cds_pb2.Finding], unrecognized_count: int
) -> cds_pb2.Risk:
    """Rate the risk by the most severe finding and list what drove it.

    `findings` must be sorted with `finding_order`.
    """
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


# Copied from services/cds/screening/inputs.py.


@dataclass(frozen=True)
class ScreenedMedication:
    """A recognized medication and the request item it came from."""

    # The name as the request gave it, or the RxNorm code without a name.
    subject: str
    drugs: frozenset[str]
    item: cds_pb2.Medication


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


def make_finding(
    category: int,
    text: FindingText,
    subjects: Sequence[str],
    summary: str,
    detail: str,
    rule_id: str,
    severity: int | None = None,
) -> cds_pb2.Finding:
    """Build a finding from a rule's text, cited with the rule's source."""
    return Finding(
        category=category,
        severity=text.severity if severity is None else severity,
        subjects=list(subjects),
        summary=summary,
        detail=detail,
        action=text.action,
        source=text.source.to_proto(),
        rule_id=rule_id,
    )


def with_ingredients(
    detail: str, matches: list[tuple[str, str]], kb: KnowledgeBase
) -> str:
    """Append which ingredient each brand or product name was matched to."""
    notes = [
        f"{subject} contains {kb.drugs[drug_id].name}."
        for subject, drug_id in matches
        if name_words(subject) != name_words(kb.drugs[drug_id].name)
    ]

    return " ".join([detail, *notes])


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
            medications.append(ScreenedMedication(subject, drugs, medication))
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
        match = resolve_condition(
            kb, condition.name, condition.icd10, condition.snomed
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


# Copied from services/cds/screening/interactions.py.


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


# Copied from services/cds/screening/allergies.py.


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


# Copied from services/cds/screening/conditions.py.


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


# Copied from services/cds/screening/duplicates.py.


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


# Copied from services/cds/screening/patient.py.

# Ages at which pregnancy and lactation are screened when their status is
# not given, as a bound on when to report the missing status.
CHILDBEARING_AGES = range(10, 56)


def _drug_findings(
    category: int,
    rule_id: str,
    text: FindingText,
    drugs: frozenset[str],
    medications: list[ScreenedMedication],
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    for medication in medications:
        matched = sorted(medication.drugs & drugs)
        if not matched:
            continue
        yield make_finding(
            category,
            text,
            [medication.subject],
            f"{medication.subject}: {text.summary}",
            with_ingredients(
                text.detail, [(medication.subject, matched[0])], kb
            ),
            rule_id,
        )


def patient_findings(
    medications: list[ScreenedMedication],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> Iterator[cds_pb2.Finding]:
    """Yield the age, pregnancy, lactation and renal findings."""
    rules: list[tuple[int, object]] = []
    if patient.HasField("age_years"):
        rules += [
            (Category.AGE, rule)
            for rule in kb.age_rules
            if rule.applies(patient.age_years)
        ]
    if patient.pregnant:
        rules += [(Category.PREGNANCY, rule) for rule in kb.pregnancy_rules]
    if patient.lactating:
        rules += [(Category.PREGNANCY, rule) for rule in kb.lactation_rules]
    if patient.HasField("egfr"):
        rules += [
            (Category.RENAL, rule)
            for rule in kb.renal_rules
            if rule.applies(patient.egfr)
        ]
    for category, rule in rules:
        yield from _drug_findings(
            category, rule.id, rule.text, rule.drugs, medications, kb
        )


def _any_covered(
    medications: list[ScreenedMedication], rules: Iterable
) -> bool:
    covered = frozenset().union(*(rule.drugs for rule in rules))

    return any(medication.drugs & covered for medication in medications)


def _could_be_pregnant(patient: cds_pb2.Patient) -> bool:
    if patient.sex == Sex.MALE:
        return False

    return (
        not patient.HasField("age_years")
        or patient.age_years in CHILDBEARING_AGES
    )


def missing_patient_inputs(
    medications: list[ScreenedMedication],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
) -> list[cds_pb2.NotScreened]:
    """List the patient checks that apply to a medication but lack input."""
    gaps = []
    if not patient.HasField("egfr") and _any_covered(
        medications, kb.renal_rules
    ):
        gaps.append(not_screened("renal dosing", "eGFR not given"))
    if not patient.HasField("age_years") and _any_covered(
        medications, kb.age_rules
    ):
        gaps.append(not_screened("age screening", "age not given"))
    if _could_be_pregnant(patient):
        if not patient.HasField("pregnant") and _any_covered(
            medications, kb.pregnancy_rules
        ):
            gaps.append(
                not_screened(
                    "pregnancy screening", "pregnancy status not given"
                )
            )
        if not patient.HasField("lactating") and _any_covered(
            medications, kb.lactation_rules
        ):
            gaps.append(
                not_screened(
                    "lactation screening", "lactation status not given"
                )
            )

    return gaps


# Copied from services/cds/screening/doses.py.

# Display spellings in finding texts for the canonical units that differ
# from their usual spelling.
_UNIT_LABELS = {"meq": "mEq", "unit": "units"}


def _amount_text(value: float, unit: str) -> str:
    label = _UNIT_LABELS.get(unit, unit)
    if value == int(value):
        return f"{int(value):,} {label}"

    return f"{value:,.3g} {label}"


def _in(amount: Amount, unit: str) -> float:
    converted = dosing.in_unit(amount.value, amount.unit, unit)
    # The knowledge base rejects limits whose amounts do not convert.
    assert converted is not None

    return converted


def _limits_for_route(
    limits: list[DoseLimit], route: str | None
) -> list[DoseLimit]:
    """Return the limits for a route, or every limit without one.

    Without a route the limits come most permissive first, by maximum
    daily dose.
    """
    if route is not None:
        return [
            limit
            for limit in limits
            if not limit.routes or route in limit.routes
        ]
    # The knowledge base keeps one drug's limits in one dimension (mass,
    # units, mEq or mmol), so they compare in the first limit's unit.
    unit = limits[0].max_daily.unit

    return sorted(
        limits, key=lambda limit: _in(limit.max_daily, unit), reverse=True
    )


def _limits_for_age(
    limits: list[DoseLimit], patient: cds_pb2.Patient
) -> list[DoseLimit]:
    """Return the pediatric limits that cover the patient's age, if any.

    Otherwise return the limits without an upper age, which also serve a
    patient of unknown age.
    """
    if patient.HasField("age_years"):
        age = patient.age_years
        pediatric = [
            limit
            for limit in limits
            if limit.below_age is not None
            and limit.min_age <= age < limit.below_age
        ]
        if pediatric:
            return pediatric

    return [limit for limit in limits if limit.below_age is None]


def _unrouted_finding(
    medication: ScreenedMedication,
    unit: str,
    limits: list[DoseLimit],
    patient: cds_pb2.Patient,
    gaps: list[cds_pb2.NotScreened],
) -> cds_pb2.Finding | None:
    """Check an order without a route against the limit of every route.

    The order may be meant for any of the routes, so it gives a finding
    only when no limit clears it, and then the finding of the most
    permissive limit. The gaps come from that limit alone.
    """
    most, *others = limits
    finding = _check_limit(medication, unit, most, patient, gaps)
    if finding is None:
        return None
    for limit in others:
        # A limit that could not be checked, for the patient's age for
        # example, does not clear the order.
        limit_gaps: list[cds_pb2.NotScreened] = []
        other = _check_limit(medication, unit, limit, patient, limit_gaps)
        if other is None and not limit_gaps:
            return None

    return finding


def dose_findings(
    medications: list[ScreenedMedication],
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
    gaps: list[cds_pb2.NotScreened],
) -> Iterator[cds_pb2.Finding]:
    """Yield a finding for each medication dosed above its limit."""
    for medication in medications:
        limits = [
            limit for limit in kb.dose_limits if limit.drug in medication.drugs
        ]
        item = medication.item
        if not limits or not item.HasField("dose") or item.dose.value <= 0:
            continue
        subject = medication.subject
        if len(medication.drugs) > 1:
            gaps.append(
                not_screened(
                    subject,
                    "dose of a combination product cannot be assigned to "
                    "each ingredient, so it was not checked",
                )
            )
            continue
        unit = dosing.canonical_unit(item.dose.unit)
        if unit is None:
            gaps.append(
                not_screened(
                    subject,
                    f'dose unit "{item.dose.unit}" not recognized, so the '
                    "dose was not checked: give the amount in g, mg, mcg, "
                    "units, mEq or mmol",
                )
            )
            continue
        route = None
        if item.route.strip():
            route = dosing.canonical_route(item.route)
            if route is None:
                gaps.append(
                    not_screened(
                        subject,
                        f'route "{item.route}" not recognized, so the dose '
                        "was not checked",
                    )
                )
                continue
        route_limits = _limits_for_age(
            _limits_for_route(limits, route), patient
        )
        if not route_limits:
            gaps.append(
                not_screened(
                    subject,
                    f'no dose limit for the route "{item.route}" in the '
                    "knowledge base, so the dose was not checked",
                )
            )
        if route is None and route_limits:
            finding = _unrouted_finding(
                medication, unit, route_limits, patient, gaps
            )
            if finding is not None:
                yield finding
            continue
        for limit in route_limits:
            finding = _check_limit(medication, unit, limit, patient, gaps)
            if finding is not None:
                yield finding


def _daily_problem(
    daily: float, limit: DoseLimit, by_weight: float | None
) -> str:
    unit = limit.max_daily.unit
    maximum = _amount_text(_in(limit.max_daily, unit), unit)
    if by_weight is not None and limit.max_daily_per_kg is not None:
        per_kg = _amount_text(_in(limit.max_daily_per_kg, unit), unit)
        maximum += f" or {per_kg}/kg of body weight, whichever is lower"

    return (
        f"The order allows up to {_amount_text(daily, unit)} a day, above "
        f"the maximum daily dose of {maximum}."
    )


def _weekly_problems(
    dose: float, frequency: dosing.Frequency, limit: DoseLimit
) -> list[str]:
    """Describe how an order exceeds a weekly maximum amount or count.

    `dose` is in the unit of the limit's `max_daily`.
    """
    unit = limit.max_daily.unit
    doses_per_week = frequency.doses_per_day * 7
    problems = []
    if limit.max_weekly is not None:
        weekly = dose * doses_per_week
        max_weekly = _in(limit.max_weekly, unit)
        if weekly > max_weekly * (1 + 1e-9):
            problems.append(
                f"The order allows up to {_amount_text(weekly, unit)} a "
                "week, above the maximum weekly dose of "
                f"{_amount_text(max_weekly, unit)}."
            )
    maximum = limit.max_doses_per_week
    if maximum is not None and doses_per_week > maximum * (1 + 1e-9):
        problems.append(
            f"The order gives up to {doses_per_week:g} doses a week, more "
            f"than the labeled maximum of {maximum} doses a week."
        )

    return problems


def _check_limit(
    medication: ScreenedMedication,
    unit: str,
    limit: DoseLimit,
    patient: cds_pb2.Patient,
    gaps: list[cds_pb2.NotScreened],
) -> cds_pb2.Finding | None:
    subject = medication.subject
    limit_unit = limit.max_daily.unit
    dose = dosing.in_unit(medication.item.dose.value, unit, limit_unit)
    if dose is None:
        gaps.append(
            not_screened(
                subject,
                f"dose in {unit} cannot be compared with the limit in "
                f"{limit_unit}, so the dose was not checked",
            )
        )
        return None

    has_weight = patient.HasField("weight_kg")
    by_weight = None
    if limit.max_daily_per_kg is not None and has_weight:
        by_weight = _in(limit.max_daily_per_kg, limit_unit) * patient.weight_kg
    if limit.below_age is not None and limit.max_daily_per_kg is not None:
        if by_weight is None:
            gaps.append(
                not_screened(
                    subject,
                    "weight not given, so the dose was not checked against "
                    "the pediatric maximum per kg",
                )
            )
            return None
    if patient.HasField("age_years") and patient.age_years < limit.min_age:
        if by_weight is None:
            gaps.append(
                not_screened(
                    subject,
                    f"dose limits under {limit.min_age} years are not in "
                    "the knowledge base, so the dose was not checked",
                )
            )
            return None
        max_daily = by_weight
    else:
        max_daily = _in(limit.max_daily, limit_unit)
        if by_weight is not None:
            max_daily = min(max_daily, by_weight)

    problems = []
    if limit.max_single is not None:
        max_single = _in(limit.max_single, limit_unit)
        if dose > max_single:
            problems.append(
                f"A single dose of {_amount_text(dose, limit_unit)} is "
                f"above the maximum of {_amount_text(max_single, limit_unit)}."
            )
    frequency = dosing.parse_frequency(medication.item.frequency)
    if frequency is None and dose > max_daily:
        problems.append(
            f"A single dose of {_amount_text(dose, limit_unit)} is above the "
            "maximum daily dose."
        )
    elif frequency is None:
        reason = "not given"
        if medication.item.frequency.strip():
            reason = f'"{medication.item.frequency}" not recognized'
        gaps.append(
            not_screened(
                subject,
                f"frequency {reason}, so the daily dose was not checked",
            )
        )
    else:
        daily = dose * frequency.doses_per_day
        if daily > max_daily * (1 + 1e-9):
            problems.append(_daily_problem(daily, limit, by_weight))
        problems += _weekly_problems(dose, frequency, limit)
    if not problems:
        return None

    return make_finding(
        Category.DOSE,
        limit.text,
        [subject],
        f"{subject}: {limit.text.summary}",
        " ".join([limit.text.detail, *problems]),
        limit.id,
    )


# Copied from services/cds/screening/__init__.py.


def _unique(messages: list) -> list:
    """Drop repeated messages, keeping the first of each in order."""
    seen: dict[bytes, object] = {}
    for message in messages:
        seen.setdefault(message.SerializeToString(deterministic=True), message)

    return list(seen.values())


def screen(
    request: cds_pb2.ClinicalReviewRequest, kb: KnowledgeBase
) -> ScreeningResult:
    """Screen the medications against every module of the knowledge base.

    Items and checks that could not be screened are listed, never dropped.
    """
    gaps: list[cds_pb2.NotScreened] = []
    medications, unrecognized = resolve_medications(
        request.medications, kb, gaps
    )
    allergies = resolve_allergies(request.allergies, kb, gaps)
    conditions = resolve_conditions(request.conditions, kb, gaps)
    patient = request.patient

    findings = [
        *interaction_findings(medications, kb),
        *allergy_findings(medications, allergies, kb),
        *condition_findings(medications, conditions, patient, kb),
        *duplicate_findings(medications, kb),
        *patient_findings(medications, patient, kb),
        *dose_findings(medications, patient, kb, gaps),
    ]
    # A medication or allergy listed twice would repeat its findings.
    findings = _unique(findings)
    findings.sort(key=finding_order)
    gaps = _unique([*gaps, *missing_patient_inputs(medications, patient, kb)])

    return ScreeningResult(
        findings=findings,
        not_screened=gaps,
        recommendations=recommendations(findings, unrecognized),
        risk=risk(findings, len(unrecognized)),
    )


# Copied from KnowledgeBase.resolve_condition and
# Condition.matches_icd10.


def matches_icd10(condition: Condition, code: str) -> bool:
    normalized = normalize_icd10(code)

    return any(normalized.startswith(p) for p in condition.icd10_prefixes)


def resolve_condition(
    kb: KnowledgeBase, name: str, icd10: str, snomed: str
) -> ConditionMatch:
    """Find the conditions a request's condition stands for.

    The ICD-10 code matches by prefix, the SNOMED CT code exactly and
    the name by whole-word phrases, and the conditions of all three
    are combined.
    """
    found: set[str] = set()
    unknown_icd10 = False
    if icd10.strip():
        by_code = {
            condition.id
            for condition in kb.conditions.values()
            if matches_icd10(condition, icd10)
        }
        found |= by_code
        unknown_icd10 = not by_code
    unknown_snomed = False
    if snomed.strip():
        by_snomed = {
            condition.id
            for condition in kb.conditions.values()
            if snomed.strip() in condition.snomed_codes
        }
        found |= by_snomed
        unknown_snomed = not by_snomed
    if name.strip():
        (by_name,), _ = scan_phrases(
            name_words(name), (kb.condition_terms,), kb.max_name_words
        )
        found |= by_name

    return ConditionMatch(tuple(sorted(found)), unknown_icd10, unknown_snomed)
