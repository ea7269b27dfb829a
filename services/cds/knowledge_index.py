"""Indexes of the knowledge base's rules by drug, condition and code.

Screening looks up the few rules that can apply to a request's drugs and
conditions here, instead of testing every rule against every item. Each
index returns rules in knowledge-base order, so screening yields its
findings in the same order as a scan of every rule would.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar

from services.cds.rules import (
    AgeRule,
    Condition,
    ConditionRule,
    DoseLimit,
    DuplicateClassRule,
    InteractionRule,
    PatientStateRule,
    RenalRule,
    normalize_icd10,
)
from services.cds.vocabulary import Drug, name_words

RuleT = TypeVar("RuleT")


@dataclass(frozen=True)
class RuleIndex(Generic[RuleT]):
    """Rules of one module, and the positions of the rules per key.

    A key is a drug id or a condition id, depending on the index.
    """

    rules: tuple[RuleT, ...]
    positions: Mapping[str, tuple[int, ...]]

    @classmethod
    def build(
        cls,
        rules: Iterable[RuleT],
        keys_of: Callable[[RuleT], Iterable[str]],
    ) -> "RuleIndex[RuleT]":
        """Index each rule under every key that `keys_of` returns for it."""
        rules = tuple(rules)
        positions: dict[str, list[int]] = {}
        for position, rule in enumerate(rules):
            for key in keys_of(rule):
                positions.setdefault(key, []).append(position)

        return cls(
            rules,
            MappingProxyType(
                {key: tuple(found) for key, found in positions.items()}
            ),
        )

    def positions_for(self, keys: Iterable[str]) -> set[int]:
        """Return the positions of the rules indexed under any of `keys`."""
        found: set[int] = set()
        for key in keys:
            found.update(self.positions.get(key, ()))

        return found

    def rules_at(self, positions: Iterable[int]) -> list[RuleT]:
        """Return the rules at `positions`, in knowledge-base order."""
        return [self.rules[position] for position in sorted(positions)]

    def rules_for(self, keys: Iterable[str]) -> list[RuleT]:
        """Return the rules indexed under any of `keys`, in order."""
        return self.rules_at(self.positions_for(keys))

    def covers_any(self, keys: Iterable[str]) -> bool:
        """Return whether any rule is indexed under one of `keys`."""
        return any(key in self.positions for key in keys)


@dataclass(frozen=True)
class KnowledgeIndex:
    """Every index that screening uses, built once per knowledge base.

    A rule index is keyed by drug id unless its name says otherwise. An
    interaction is indexed under the drugs of both sides, and a duplicate
    therapy rule under the members of its class.
    """

    interactions: RuleIndex[InteractionRule]
    condition_rules_by_drug: RuleIndex[ConditionRule]
    condition_rules_by_condition: RuleIndex[ConditionRule]
    age_rules: RuleIndex[AgeRule]
    pregnancy_rules: RuleIndex[PatientStateRule]
    lactation_rules: RuleIndex[PatientStateRule]
    renal_rules: RuleIndex[RenalRule]
    duplicate_rules: RuleIndex[DuplicateClassRule]
    dose_limits: RuleIndex[DoseLimit]
    # Normalized ICD-10 prefix to the conditions that list it, and the
    # lengths that the prefixes come in, longest first.
    icd10_prefixes: Mapping[str, tuple[str, ...]]
    icd10_prefix_lengths: tuple[int, ...]
    # SNOMED CT concept id to the conditions that list it.
    snomed_codes: Mapping[str, tuple[str, ...]]
    # Name words of each drug's name, to tell a brand from the ingredient.
    drug_name_words: Mapping[str, tuple[str, ...]]

    def icd10_conditions(self, code: str) -> set[str]:
        """Return the conditions with an ICD-10 prefix that starts `code`.

        The code is normalized as the prefixes are, so "i50.9" matches I50.
        """
        normalized = normalize_icd10(code)
        found: set[str] = set()
        for length in self.icd10_prefix_lengths:
            if length <= len(normalized):
                found.update(self.icd10_prefixes.get(normalized[:length], ()))

        return found


def _codes_index(
    conditions: Iterable[Condition],
    codes_of: Callable[[Condition], Iterable[str]],
) -> Mapping[str, tuple[str, ...]]:
    by_code: dict[str, list[str]] = {}
    for condition in conditions:
        for code in codes_of(condition):
            by_code.setdefault(code, []).append(condition.id)

    return MappingProxyType(
        {code: tuple(ids) for code, ids in by_code.items()}
    )


def build_index(
    *,
    drugs: Mapping[str, Drug],
    conditions: Mapping[str, Condition],
    interactions: tuple[InteractionRule, ...],
    condition_rules: tuple[ConditionRule, ...],
    age_rules: tuple[AgeRule, ...],
    pregnancy_rules: tuple[PatientStateRule, ...],
    lactation_rules: tuple[PatientStateRule, ...],
    renal_rules: tuple[RenalRule, ...],
    duplicate_rules: tuple[DuplicateClassRule, ...],
    dose_limits: tuple[DoseLimit, ...],
) -> KnowledgeIndex:
    """Build the indexes of a loaded knowledge base's rules."""
    icd10_prefixes = _codes_index(
        conditions.values(), lambda condition: condition.icd10_prefixes
    )

    return KnowledgeIndex(
        interactions=RuleIndex.build(
            interactions,
            lambda rule: rule.object_drugs | rule.precipitant_drugs,
        ),
        condition_rules_by_drug=RuleIndex.build(
            condition_rules, lambda rule: rule.drugs
        ),
        condition_rules_by_condition=RuleIndex.build(
            condition_rules, lambda rule: (rule.condition,)
        ),
        age_rules=RuleIndex.build(age_rules, lambda rule: rule.drugs),
        pregnancy_rules=RuleIndex.build(
            pregnancy_rules, lambda rule: rule.drugs
        ),
        lactation_rules=RuleIndex.build(
            lactation_rules, lambda rule: rule.drugs
        ),
        renal_rules=RuleIndex.build(renal_rules, lambda rule: rule.drugs),
        duplicate_rules=RuleIndex.build(
            duplicate_rules, lambda rule: rule.members
        ),
        dose_limits=RuleIndex.build(dose_limits, lambda limit: (limit.drug,)),
        icd10_prefixes=icd10_prefixes,
        icd10_prefix_lengths=tuple(
            sorted({len(prefix) for prefix in icd10_prefixes}, reverse=True)
        ),
        snomed_codes=_codes_index(
            conditions.values(), lambda condition: condition.snomed_codes
        ),
        drug_name_words=MappingProxyType(
            {drug_id: name_words(drug.name) for drug_id, drug in drugs.items()}
        ),
    )
