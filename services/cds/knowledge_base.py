"""Load and validate the cited knowledge base that screening applies.

The knowledge lives as JSON in the `knowledge` folder next to this module,
one file per module: `manifest.json` (version), `drugs.json` (vocabulary),
`interactions.json`, `allergy_classes.json`, `conditions.json`,
`age.json`, `pregnancy.json`, `renal.json`, `duplicate_therapy.json` and
`doses.json`. Every entry has a stable `id` and a `source`. Rules name
drugs and classes by id, and a class reference expands to every drug of
that class when the files load.
"""

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from services.cds import dosing
from services.cds.knowledge_entries import (
    SEVERITIES,
    Entry,
    Source,
    entry_list,
    read_module,
)
from services.cds.knowledge_index import KnowledgeIndex, build_index
from services.cds.rules import (
    AgeRule,
    AllergyClass,
    AllergyRule,
    Condition,
    ConditionRule,
    CrossReactivity,
    DoseLimit,
    DuplicateClassRule,
    FindingText,
    InteractionRule,
    PatientStateRule,
    RenalRule,
    parse_age_rule,
    parse_allergy_rules,
    parse_condition_rules,
    parse_dose_limit,
    parse_duplicate_rules,
    parse_interaction,
    parse_patient_state_rule,
    parse_renal_rule,
)
from services.cds.vocabulary import (
    IGNORED_WORDS,
    Drug,
    DrugClass,
    NameMatch,
    Product,
    Vocabulary,
    name_words,
    scan_phrases,
)

KNOWLEDGE_DIR = Path(__file__).parent / "knowledge"

__all__ = [
    "IGNORED_WORDS",
    "KNOWLEDGE_DIR",
    "SEVERITIES",
    "AllergyMatch",
    "ConditionMatch",
    "KnowledgeBase",
    "NameMatch",
    "Source",
    "load_knowledge_base",
    "name_words",
]


@dataclass(frozen=True)
class AllergyMatch:
    """Allergy classes and drugs found in an allergy's substance text."""

    allergy_classes: tuple[str, ...]
    drugs: tuple[str, ...]
    unrecognized: tuple[str, ...]


@dataclass(frozen=True)
class ConditionMatch:
    """Conditions found by a condition's codes and name.

    `unknown_icd10` and `unknown_snomed` are set when the request gave a
    code that no condition of the knowledge base covers.
    """

    conditions: tuple[str, ...]
    unknown_icd10: bool
    unknown_snomed: bool


@dataclass(frozen=True)
class KnowledgeBase:
    """The loaded knowledge base, built by `load_knowledge_base`."""

    version: str
    description: str
    classes: Mapping[str, DrugClass]
    drugs: Mapping[str, Drug]
    products: Mapping[str, Product]
    interactions: tuple[InteractionRule, ...]
    allergy_classes: tuple[AllergyClass, ...]
    cross_reactivities: tuple[CrossReactivity, ...]
    same_drug_allergy: AllergyRule
    renal_rules: tuple[RenalRule, ...]
    conditions: Mapping[str, Condition]
    condition_rules: tuple[ConditionRule, ...]
    age_rules: tuple[AgeRule, ...]
    pregnancy_rules: tuple[PatientStateRule, ...]
    lactation_rules: tuple[PatientStateRule, ...]
    duplicate_rules: tuple[DuplicateClassRule, ...]
    same_ingredient_rule_id: str
    same_ingredient: FindingText
    dose_limits: tuple[DoseLimit, ...]
    # Name words of every drug name, brand, synonym and product, mapped to
    # the drug ids they stand for.
    names: Mapping[tuple[str, ...], tuple[str, ...]]
    rxnorm_codes: Mapping[str, tuple[str, ...]]
    allergy_terms: Mapping[tuple[str, ...], str]
    condition_terms: Mapping[tuple[str, ...], str]
    max_name_words: int
    # Derived from the fields above when the knowledge base is built.
    index: KnowledgeIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The dataclass is frozen, so its derived field is set this way.
        object.__setattr__(
            self,
            "index",
            build_index(
                drugs=self.drugs,
                conditions=self.conditions,
                interactions=self.interactions,
                condition_rules=self.condition_rules,
                age_rules=self.age_rules,
                pregnancy_rules=self.pregnancy_rules,
                lactation_rules=self.lactation_rules,
                renal_rules=self.renal_rules,
                duplicate_rules=self.duplicate_rules,
                dose_limits=self.dose_limits,
            ),
        )

    def class_members(self, class_id: str) -> frozenset[str]:
        return frozenset(
            drug.id for drug in self.drugs.values() if class_id in drug.classes
        )

    def resolve_rxnorm(self, code: str) -> tuple[str, ...]:
        """Return the drug ids of an RxNorm code, or () if it is unknown."""
        return self.rxnorm_codes.get(code.strip(), ())

    def resolve_name(self, name: str) -> NameMatch:
        """Find the drugs in a medication name, case-insensitively.

        Ingredient, brand, synonym and product names match as whole words,
        longest first, so "metoprolol succinate ER 50 mg" gives metoprolol
        and "Augmentin" gives amoxicillin and clavulanate.
        """
        (drugs,), leftover = scan_phrases(
            name_words(name), (self.names,), self.max_name_words
        )

        return NameMatch(tuple(sorted(drugs)), leftover)

    def resolve_allergy(self, substance: str) -> AllergyMatch:
        """Find allergy classes and drugs in an allergy's substance text.

        A class word ("penicillins", "sulfa") gives its class, and wins over
        a drug name of the same length. A drug gives itself and every
        allergy class it belongs to.
        """
        (classes, drugs), leftover = scan_phrases(
            name_words(substance),
            (self.allergy_terms, self.names),
            self.max_name_words,
        )
        for allergy_class in self.allergy_classes:
            if allergy_class.members & drugs:
                classes.add(allergy_class.id)

        return AllergyMatch(
            tuple(sorted(classes)), tuple(sorted(drugs)), leftover
        )

    def resolve_condition(
        self, name: str, icd10: str, snomed: str
    ) -> ConditionMatch:
        """Find the conditions a request's condition stands for.

        The ICD-10 code matches by prefix, the SNOMED CT code exactly and
        the name by whole-word phrases, and the conditions of all three
        are combined.
        """
        found: set[str] = set()
        unknown_icd10 = False
        if icd10.strip():
            by_code = self.index.icd10_conditions(icd10)
            found |= by_code
            unknown_icd10 = not by_code
        unknown_snomed = False
        if snomed.strip():
            by_snomed = self.index.snomed_codes.get(snomed.strip(), ())
            found.update(by_snomed)
            unknown_snomed = not by_snomed
        if name.strip():
            (by_name,), _ = scan_phrases(
                name_words(name), (self.condition_terms,), self.max_name_words
            )
            found |= by_name

        return ConditionMatch(
            tuple(sorted(found)), unknown_icd10, unknown_snomed
        )


def load_knowledge_base(directory: Path | None = None) -> KnowledgeBase:
    """Load and validate the knowledge base, once per directory.

    Raises ValueError naming the file and entry when an entry lacks its id
    or source, references an unknown drug, class or condition, or is
    malformed.
    """
    return _load(Path(directory or KNOWLEDGE_DIR).resolve())


def _parse_each(vocabulary, data, file, key, parse) -> tuple:
    return tuple(
        parse(vocabulary, raw, position)
        for position, raw in enumerate(entry_list(data, file, key))
    )


@functools.cache
def _load(directory: Path) -> KnowledgeBase:
    manifest = Entry(
        "manifest.json", "manifest", read_module(directory, "manifest")
    )
    manifest.allow("version", "description")
    vocabulary = Vocabulary(read_module(directory, "drugs"))

    interactions = _parse_each(
        vocabulary,
        read_module(directory, "interactions"),
        "interactions.json",
        "interactions",
        parse_interaction,
    )
    allergies = parse_allergy_rules(
        vocabulary, read_module(directory, "allergy_classes")
    )
    conditions = parse_condition_rules(
        vocabulary, read_module(directory, "conditions")
    )
    age_rules = _parse_each(
        vocabulary,
        read_module(directory, "age"),
        "age.json",
        "age_rules",
        parse_age_rule,
    )
    pregnancy = read_module(directory, "pregnancy")
    renal_rules = _parse_each(
        vocabulary,
        read_module(directory, "renal"),
        "renal.json",
        "renal_rules",
        parse_renal_rule,
    )
    duplicates = parse_duplicate_rules(
        vocabulary, read_module(directory, "duplicate_therapy")
    )
    dose_limits = tuple(
        parse_dose_limit(
            vocabulary,
            raw,
            position,
            dosing.ROUTES,
            frozenset(dosing.UNIT_SCALES),
        )
        for position, raw in enumerate(
            entry_list(
                read_module(directory, "doses"), "doses.json", "dose_limits"
            )
        )
    )
    _check_dose_units(dose_limits)

    return KnowledgeBase(
        version=manifest.text("version"),
        description=manifest.text("description"),
        classes=MappingProxyType(vocabulary.classes),
        drugs=MappingProxyType(vocabulary.drugs),
        products=MappingProxyType(vocabulary.products),
        interactions=interactions,
        allergy_classes=allergies.classes,
        cross_reactivities=allergies.cross_reactivities,
        same_drug_allergy=allergies.same_drug,
        renal_rules=renal_rules,
        conditions=MappingProxyType(conditions.conditions),
        condition_rules=conditions.rules,
        age_rules=age_rules,
        pregnancy_rules=_parse_each(
            vocabulary,
            pregnancy,
            "pregnancy.json",
            "pregnancy",
            parse_patient_state_rule,
        ),
        lactation_rules=_parse_each(
            vocabulary,
            pregnancy,
            "pregnancy.json",
            "lactation",
            parse_patient_state_rule,
        ),
        duplicate_rules=duplicates.classes,
        same_ingredient_rule_id=duplicates.same_ingredient_id,
        same_ingredient=duplicates.same_ingredient,
        dose_limits=dose_limits,
        names=MappingProxyType(vocabulary.names),
        rxnorm_codes=MappingProxyType(vocabulary.rxnorm_codes),
        allergy_terms=MappingProxyType(allergies.terms),
        condition_terms=MappingProxyType(conditions.terms),
        max_name_words=max(
            map(
                len,
                [*vocabulary.names, *allergies.terms, *conditions.terms],
            ),
            default=1,
        ),
    )


def _check_dose_units(limits: tuple[DoseLimit, ...]) -> None:
    """Reject limits whose amounts cannot be compared with each other.

    A limit's own amounts must share a dimension, and so must the limits
    of one drug, because an order without a route is checked against the
    most permissive of them.
    """
    first_by_drug: dict[str, DoseLimit] = {}
    for limit in limits:
        first = first_by_drug.setdefault(limit.drug, limit)
        if (
            dosing.in_unit(
                limit.max_daily.value,
                limit.max_daily.unit,
                first.max_daily.unit,
            )
            is None
        ):
            raise ValueError(
                f"doses.json: {limit.id}: unit {limit.max_daily.unit!r} "
                f"cannot be compared with {first.id}'s "
                f"{first.max_daily.unit!r} for the same drug: give both "
                "limits in one dimension"
            )
        for amount in (
            limit.max_daily_per_kg,
            limit.max_single,
            limit.max_weekly,
        ):
            if amount is None:
                continue
            if (
                dosing.in_unit(amount.value, amount.unit, limit.max_daily.unit)
                is None
            ):
                raise ValueError(
                    f"doses.json: {limit.id}: unit {amount.unit!r} cannot be "
                    f"compared with max_daily's {limit.max_daily.unit!r}"
                )
