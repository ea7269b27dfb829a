"""Rules of the knowledge base, and how each module's JSON is parsed.

Every rule names drugs and classes by their ids in drugs.json; a class
expands to all of its member drugs when the files load. Every rule carries
its own severity, wording and source, so the screening engine holds no
clinical knowledge of its own.
"""

import re
from dataclasses import dataclass
from typing import Any

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_entries import Entry, Source, entry_list
from services.cds.vocabulary import Vocabulary, name_words

# Fields every finding-producing rule has, besides its own.
_FINDING_FIELDS = ("id", "severity", "summary", "detail", "action", "source")
_ICD10_PREFIX = re.compile(r"^[A-Z][0-9]{2}[0-9A-Z]{0,4}$")
# Read once, because each attribute read of a protobuf enum is a lookup.
SEVERE_ALLERGY = cds_pb2.Allergy.Severity.SEVERE


def normalize_icd10(code: str) -> str:
    """Return an ICD-10 code in upper case without its dot or spaces."""
    return re.sub(r"[\s.]", "", code).upper()


@dataclass(frozen=True)
class FindingText:
    """What a finding of a rule says, and where the rule comes from."""

    severity: int
    summary: str
    detail: str
    action: str
    source: Source


def _finding_text(entry: Entry) -> FindingText:
    return FindingText(
        severity=entry.severity("severity"),
        summary=entry.text("summary"),
        detail=entry.text("detail"),
        action=entry.text("action"),
        source=entry.source(),
    )


@dataclass(frozen=True)
class Rule:
    """A knowledge-base entry that produces findings."""

    id: str
    text: FindingText

    @property
    def severity(self) -> int:
        return self.text.severity

    @property
    def source(self) -> Source:
        return self.text.source


@dataclass(frozen=True)
class InteractionRule(Rule):
    """A drug-drug interaction between any object and any precipitant.

    Both sides are expanded to drug ids. When both sides name the same
    class, the rule pairs any two different members of it. The summary
    states the effect, the action the management.
    """

    object_drugs: frozenset[str]
    precipitant_drugs: frozenset[str]
    mechanism: str


@dataclass(frozen=True)
class AllergyRule(Rule):
    """A drug-allergy rule whose severity depends on the recorded reaction."""

    severe_reaction_severity: int
    members: frozenset[str]

    def severity_for(self, allergy_severity: int) -> int:
        """Return the finding severity for an allergy of this severity."""
        if allergy_severity == SEVERE_ALLERGY:
            return self.severe_reaction_severity

        return self.text.severity


@dataclass(frozen=True)
class AllergyClass(AllergyRule):
    """An allergy to any member, or to the class named by one of `terms`."""

    name: str
    terms: tuple[str, ...]


@dataclass(frozen=True)
class CrossReactivity(AllergyRule):
    """Members that may react in a patient allergic to `allergy_class`."""

    allergy_class: str


@dataclass(frozen=True)
class RenalRule(Rule):
    """A caution for `drugs` when egfr_at_least <= eGFR < egfr_below."""

    drugs: frozenset[str]
    egfr_at_least: float
    egfr_below: float

    def applies(self, egfr: float) -> bool:
        return self.egfr_at_least <= egfr < self.egfr_below


@dataclass(frozen=True)
class Condition:
    """A condition that rules refer to, recognized by code or name."""

    id: str
    name: str
    # Normalized ICD-10-CM prefixes: "I50" matches I50.9 and I50.22.
    icd10_prefixes: tuple[str, ...]
    snomed_codes: tuple[str, ...]
    terms: tuple[str, ...]
    source: Source

    def matches_icd10(self, code: str) -> bool:
        normalized = normalize_icd10(code)

        return any(normalized.startswith(p) for p in self.icd10_prefixes)


@dataclass(frozen=True)
class ConditionRule(Rule):
    """A drug that is contraindicated or cautioned in a condition.

    With `min_age`, the rule applies only from that age on, as the AGS
    Beers Criteria's drug-disease table does for adults 65 and over.
    """

    condition: str
    drugs: frozenset[str]
    min_age: int | None


@dataclass(frozen=True)
class AgeRule(Rule):
    """A caution for `drugs` when min_age <= age < below_age."""

    drugs: frozenset[str]
    min_age: int
    below_age: int | None

    def applies(self, age_years: int) -> bool:
        if age_years < self.min_age:
            return False

        return self.below_age is None or age_years < self.below_age


@dataclass(frozen=True)
class PatientStateRule(Rule):
    """A caution for `drugs` in pregnancy or during lactation."""

    drugs: frozenset[str]


@dataclass(frozen=True)
class DuplicateClassRule(Rule):
    """Two or more different medications that share a therapeutic class."""

    drug_class: str
    members: frozenset[str]


@dataclass(frozen=True)
class Amount:
    """A dose amount in a unit of the units module."""

    value: float
    unit: str


@dataclass(frozen=True)
class DoseLimit(Rule):
    """Maximum doses of one drug by the routes given.

    `routes` are canonical route names; empty means every route. A weight
    based limit applies when the patient's weight is known, as the lower
    of the two. `max_weekly` and `max_doses_per_week` bound drugs dosed
    weekly, such as oral methotrexate, whose daily maximum alone would
    pass the same dose given every day. A limit with `below_age` is a
    pediatric limit for min_age <= age < below_age, and for those ages it
    replaces the drug's other limits of the same route.
    """

    drug: str
    routes: tuple[str, ...]
    max_daily: Amount
    max_daily_per_kg: Amount | None
    max_single: Amount | None
    min_age: int
    max_weekly: Amount | None = None
    max_doses_per_week: int | None = None
    below_age: int | None = None


def parse_interaction(vocabulary: Vocabulary, raw: Any, position: int):
    entry = vocabulary.new_entry("interactions.json", raw, position)
    entry.allow(*_FINDING_FIELDS, "object", "precipitant", "mechanism")

    return InteractionRule(
        id=entry.id,
        object_drugs=vocabulary.drug_set(entry, "object"),
        precipitant_drugs=vocabulary.drug_set(entry, "precipitant"),
        mechanism=entry.text("mechanism"),
        text=_finding_text(entry),
    )


_ALLERGY_FIELDS = (*_FINDING_FIELDS, "severe_reaction_severity")


@dataclass
class AllergyRules:
    """The parsed allergy_classes.json and its index of class words."""

    classes: tuple[AllergyClass, ...]
    cross_reactivities: tuple[CrossReactivity, ...]
    same_drug: AllergyRule
    terms: dict[tuple[str, ...], str]


def parse_allergy_rules(
    vocabulary: Vocabulary, data: dict[str, Any]
) -> AllergyRules:
    file = "allergy_classes.json"
    terms: dict[tuple[str, ...], str] = {}
    classes = []
    for position, raw in enumerate(entry_list(data, file, "allergy_classes")):
        entry = vocabulary.new_entry(file, raw, position)
        entry.allow(*_ALLERGY_FIELDS, "name", "terms", "members")
        class_terms = entry.texts("terms")
        if not class_terms:
            entry.fail("'terms' must list at least one class word")
        for term in class_terms:
            owner = terms.setdefault(name_words(term), entry.id)
            if owner != entry.id:
                entry.fail(f"term {term!r} is already used by {owner}")
        classes.append(
            AllergyClass(
                id=entry.id,
                severe_reaction_severity=entry.severity(
                    "severe_reaction_severity"
                ),
                members=vocabulary.drug_set(entry, "members"),
                text=_finding_text(entry),
                name=entry.text("name"),
                terms=class_terms,
            )
        )
    class_ids = {allergy_class.id for allergy_class in classes}
    cross_reactivities = []
    for position, raw in enumerate(
        entry_list(data, file, "cross_reactivities")
    ):
        entry = vocabulary.new_entry(file, raw, position)
        entry.allow(*_ALLERGY_FIELDS, "allergy_class", "members")
        allergy_class = entry.text("allergy_class")
        if allergy_class not in class_ids:
            entry.fail(f"allergy class {allergy_class!r} is not defined")
        cross_reactivities.append(
            CrossReactivity(
                id=entry.id,
                severe_reaction_severity=entry.severity(
                    "severe_reaction_severity"
                ),
                members=vocabulary.drug_set(entry, "members"),
                text=_finding_text(entry),
                allergy_class=allergy_class,
            )
        )
    raw_same_drug = data.get("same_drug")
    if not isinstance(raw_same_drug, dict):
        raise ValueError(f"{file}: expected an object under 'same_drug'")
    entry = vocabulary.new_entry(file, raw_same_drug, 0)
    entry.allow(*_ALLERGY_FIELDS)
    same_drug = AllergyRule(
        id=entry.id,
        severe_reaction_severity=entry.severity("severe_reaction_severity"),
        members=frozenset(),
        text=_finding_text(entry),
    )

    return AllergyRules(
        tuple(classes), tuple(cross_reactivities), same_drug, terms
    )


def parse_renal_rule(vocabulary: Vocabulary, raw: Any, position: int):
    entry = vocabulary.new_entry("renal.json", raw, position)
    entry.allow(*_FINDING_FIELDS, "drugs", "egfr_at_least", "egfr_below")
    at_least = entry.number("egfr_at_least", default=0)
    below = entry.number("egfr_below")
    if not 0 <= at_least < below:
        entry.fail("expected 0 <= egfr_at_least < egfr_below")

    return RenalRule(
        id=entry.id,
        drugs=vocabulary.drug_set(entry, "drugs"),
        egfr_at_least=at_least,
        egfr_below=below,
        text=_finding_text(entry),
    )


@dataclass
class ConditionRules:
    """The parsed conditions.json and its index of condition names."""

    conditions: dict[str, Condition]
    rules: tuple[ConditionRule, ...]
    terms: dict[tuple[str, ...], str]


def parse_condition_rules(
    vocabulary: Vocabulary, data: dict[str, Any]
) -> ConditionRules:
    file = "conditions.json"
    conditions: dict[str, Condition] = {}
    terms: dict[tuple[str, ...], str] = {}
    for position, raw in enumerate(entry_list(data, file, "conditions")):
        entry = vocabulary.new_entry(file, raw, position)
        entry.allow("id", "name", "icd10", "snomed", "terms", "source")
        prefixes = tuple(normalize_icd10(c) for c in entry.texts("icd10"))
        for prefix in prefixes:
            if not _ICD10_PREFIX.match(prefix):
                entry.fail(f"icd10 {prefix!r} is not an ICD-10 code prefix")
        snomed = entry.texts("snomed")
        if not all(code.isdigit() for code in snomed):
            entry.fail("snomed codes must be numeric SNOMED CT concept ids")
        name = entry.text("name")
        condition_terms = (name, *entry.texts("terms"))
        for term in condition_terms:
            words = name_words(term)
            if not words:
                entry.fail(f"term {term!r} has no letters or digits")
            owner = terms.setdefault(words, entry.id)
            if owner != entry.id:
                entry.fail(f"term {term!r} is already used by {owner}")
        conditions[entry.id] = Condition(
            id=entry.id,
            name=name,
            icd10_prefixes=prefixes,
            snomed_codes=snomed,
            terms=condition_terms,
            source=entry.source(),
        )
    rules = []
    for position, raw in enumerate(
        entry_list(data, file, "contraindications")
    ):
        entry = vocabulary.new_entry(file, raw, position)
        entry.allow(*_FINDING_FIELDS, "condition", "drugs", "min_age")
        condition = entry.text("condition")
        if condition not in conditions:
            entry.fail(f"condition {condition!r} is not defined in {file}")
        min_age = None
        if "min_age" in entry.data:
            min_age = entry.integer("min_age")
        rules.append(
            ConditionRule(
                id=entry.id,
                condition=condition,
                drugs=vocabulary.drug_set(entry, "drugs"),
                min_age=min_age,
                text=_finding_text(entry),
            )
        )

    return ConditionRules(conditions, tuple(rules), terms)


def parse_age_rule(vocabulary: Vocabulary, raw: Any, position: int):
    entry = vocabulary.new_entry("age.json", raw, position)
    entry.allow(*_FINDING_FIELDS, "drugs", "min_age", "below_age")
    min_age = entry.integer("min_age", default=0)
    below_age = None
    if "below_age" in entry.data:
        below_age = entry.integer("below_age")
    if min_age == 0 and below_age is None:
        entry.fail("give min_age, below_age or both")
    if min_age < 0 or (below_age is not None and below_age <= min_age):
        entry.fail("expected 0 <= min_age < below_age")

    return AgeRule(
        id=entry.id,
        drugs=vocabulary.drug_set(entry, "drugs"),
        min_age=min_age,
        below_age=below_age,
        text=_finding_text(entry),
    )


def parse_patient_state_rule(
    vocabulary: Vocabulary, raw: Any, position: int
) -> PatientStateRule:
    entry = vocabulary.new_entry("pregnancy.json", raw, position)
    entry.allow(*_FINDING_FIELDS, "drugs")

    return PatientStateRule(
        id=entry.id,
        drugs=vocabulary.drug_set(entry, "drugs"),
        text=_finding_text(entry),
    )


@dataclass
class DuplicateRules:
    """The parsed duplicate_therapy.json."""

    classes: tuple[DuplicateClassRule, ...]
    same_ingredient: FindingText
    same_ingredient_id: str


def parse_duplicate_rules(
    vocabulary: Vocabulary, data: dict[str, Any]
) -> DuplicateRules:
    file = "duplicate_therapy.json"
    rules = []
    for position, raw in enumerate(
        entry_list(data, file, "duplicate_classes")
    ):
        entry = vocabulary.new_entry(file, raw, position)
        entry.allow(*_FINDING_FIELDS, "class")
        class_id = vocabulary.class_id(entry, "class")
        rules.append(
            DuplicateClassRule(
                id=entry.id,
                drug_class=class_id,
                members=vocabulary.class_members(class_id),
                text=_finding_text(entry),
            )
        )
    raw_same = data.get("same_ingredient")
    if not isinstance(raw_same, dict):
        raise ValueError(f"{file}: expected an object under 'same_ingredient'")
    entry = vocabulary.new_entry(file, raw_same, 0)
    entry.allow(*_FINDING_FIELDS)

    return DuplicateRules(tuple(rules), _finding_text(entry), entry.id)


def _amount(entry: Entry, key: str, units: frozenset[str]) -> Amount:
    child = entry.child(key)
    child.allow("value", "unit")
    value = child.number("value")
    unit = child.text("unit")
    if value <= 0:
        entry.fail(f"{key}: value must be above 0")
    if unit not in units:
        entry.fail(f"{key}: unit {unit!r} must be one of {sorted(units)}")

    return Amount(value, unit)


def parse_dose_limit(
    vocabulary: Vocabulary,
    raw: Any,
    position: int,
    routes: frozenset[str],
    units: frozenset[str],
) -> DoseLimit:
    entry = vocabulary.new_entry("doses.json", raw, position)
    entry.allow(
        *_FINDING_FIELDS,
        "drug",
        "routes",
        "max_daily",
        "max_daily_per_kg",
        "max_single",
        "min_age",
        "max_weekly",
        "max_doses_per_week",
        "below_age",
    )
    limit_routes = entry.texts("routes")
    for route in limit_routes:
        if route not in routes:
            entry.fail(f"route {route!r} must be one of {sorted(routes)}")
    per_kg = None
    if "max_daily_per_kg" in entry.data:
        per_kg = _amount(entry, "max_daily_per_kg", units)
    single = None
    if "max_single" in entry.data:
        single = _amount(entry, "max_single", units)
    weekly = None
    if "max_weekly" in entry.data:
        weekly = _amount(entry, "max_weekly", units)
    doses_per_week = None
    if "max_doses_per_week" in entry.data:
        doses_per_week = entry.integer("max_doses_per_week")
        if doses_per_week < 1:
            entry.fail("max_doses_per_week must be 1 or more")
    min_age = entry.integer("min_age", default=18)
    below_age = None
    if "below_age" in entry.data:
        below_age = entry.integer("below_age")
        if not 0 <= min_age < below_age:
            entry.fail("expected 0 <= min_age < below_age")

    return DoseLimit(
        id=entry.id,
        drug=vocabulary.drug_id(entry, "drug"),
        routes=limit_routes,
        max_daily=_amount(entry, "max_daily", units),
        max_daily_per_kg=per_kg,
        max_single=single,
        min_age=min_age,
        max_weekly=weekly,
        max_doses_per_week=doses_per_week,
        below_age=below_age,
        text=_finding_text(entry),
    )
