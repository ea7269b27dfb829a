"""Drug-condition screening: every rule, codes, names and age limits."""

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds.screening import screen
from tests.cds.screening_helpers import (
    COMPLETE,
    KB,
    Finding,
    by_rule,
    drug_name,
    request_of,
    rule_params,
)


def _rule_age(rule) -> dict:
    """Patient facts under which the rule applies."""
    age = rule.min_age if rule.min_age is not None else 40

    return COMPLETE | {"age_years": age}


class TestEveryRule:
    @pytest.mark.parametrize("rule", rule_params(KB.condition_rules))
    def test_fires_by_name_for_every_drug(self, rule):
        """Each drug of a rule fires with the condition's name."""
        condition = KB.conditions[rule.condition]
        failures = []
        for drug_id in sorted(rule.drugs):
            result = screen(
                request_of(
                    drug_name(drug_id),
                    conditions=[condition.name],
                    **_rule_age(rule),
                ),
                KB,
            )
            findings = by_rule(result, rule.id)
            expected = [(Finding.DRUG_CONDITION, rule.severity)]
            if expected != [(f.category, f.severity) for f in findings]:
                failures.append(drug_id)

        assert [] == failures

    @pytest.mark.parametrize("rule", rule_params(KB.condition_rules))
    def test_fires_by_icd10_code(self, rule):
        """A code under the condition's first prefix fires the rule."""
        condition = KB.conditions[rule.condition]
        if not condition.icd10_prefixes:
            pytest.skip("condition has no ICD-10 code")
        drug_id = min(rule.drugs)
        item = cds_pb2.Condition(icd10=condition.icd10_prefixes[0] + "9")

        result = screen(
            request_of(
                drug_name(drug_id), conditions=[item], **_rule_age(rule)
            ),
            KB,
        )

        [finding] = by_rule(result, rule.id)
        assert [drug_name(drug_id), item.icd10] == list(finding.subjects)

    @pytest.mark.parametrize("rule", rule_params(KB.condition_rules))
    def test_silent_without_the_drug(self, rule):
        """The condition alone gives no finding."""
        condition = KB.conditions[rule.condition]

        result = screen(
            request_of(conditions=[condition.name], **_rule_age(rule)), KB
        )

        assert [] == by_rule(result, rule.id)


class TestMatching:
    def test_every_term_resolves(self):
        """Every name and term of a condition resolves to it."""
        failures = [
            (condition.id, term)
            for condition in KB.conditions.values()
            for term in condition.terms
            if condition.id
            not in KB.resolve_condition(term, "", "").conditions
        ]

        assert [] == failures

    def test_icd10_prefix_with_and_without_dot(self):
        """I50.9 and I509 both fall under heart failure's I50."""
        for code in ("I50.9", "i509", " I50.22 "):
            match = KB.resolve_condition("", code, "")
            assert ("condition.heart-failure",) == match.conditions

    def test_unknown_code_of_known_name_reported(self):
        """A known name with an unknown code is screened and reported."""
        item = cds_pb2.Condition(name="heart failure", icd10="Q99.9")

        result = screen(request_of("ibuprofen", conditions=[item]), KB)

        assert by_rule(result, "dx.nsaids-heart-failure")
        [entry] = [e for e in result.not_screened if e.subject == item.name]
        assert "ICD-10 code Q99.9" in entry.reason

    def test_subject_is_the_name_as_given(self):
        """Findings name the condition as the request wrote it."""
        result = screen(
            request_of("Advil", conditions=["CHF exacerbation"], **COMPLETE),
            KB,
        )

        [finding] = by_rule(result, "dx.nsaids-heart-failure")
        assert ["Advil", "CHF exacerbation"] == list(finding.subjects)


class TestAgeLimitedRules:
    def test_older_adult_rule_needs_the_age(self):
        """A rule for 65 and over stays silent below 65 or without age."""
        rule = next(r for r in KB.condition_rules if r.min_age is not None)
        name = drug_name(min(rule.drugs))
        condition = KB.conditions[rule.condition].name

        for patient in ({"age_years": rule.min_age - 1}, {}):
            result = screen(
                request_of(name, conditions=[condition], **patient), KB
            )
            assert [] == by_rule(result, rule.id)
