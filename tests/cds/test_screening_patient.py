"""Age, pregnancy and lactation screening: every rule and its bounds."""

import pytest

from services.cds.screening import screen
from tests.cds.screening_helpers import (
    KB,
    Finding,
    Sex,
    by_rule,
    drug_name,
    request_of,
    rule_params,
)


def _fires_for_every_drug(rule, category, **patient) -> list[str]:
    """Return the drugs of a rule that fail to give its one finding."""
    failures = []
    for drug_id in sorted(rule.drugs):
        result = screen(request_of(drug_name(drug_id), **patient), KB)
        findings = by_rule(result, rule.id)
        if [(category, rule.severity)] != [
            (f.category, f.severity) for f in findings
        ]:
            failures.append(drug_id)

    return failures


class TestAgeRules:
    @pytest.mark.parametrize("rule", rule_params(KB.age_rules))
    def test_fires_inside_age_range(self, rule):
        """Every drug fires at the rule's lowest and highest ages."""
        highest = rule.below_age - 1 if rule.below_age else 120
        for age in (rule.min_age, highest):
            assert [] == _fires_for_every_drug(
                rule, Finding.AGE, age_years=age
            )

    @pytest.mark.parametrize("rule", rule_params(KB.age_rules))
    def test_silent_outside_age_range(self, rule):
        """The rule is silent just outside its range."""
        outside = [rule.below_age] if rule.below_age else []
        if rule.min_age > 0:
            outside.append(rule.min_age - 1)
        name = drug_name(min(rule.drugs))
        for age in outside:
            result = screen(request_of(name, age_years=age), KB)
            assert [] == by_rule(result, rule.id)

    def test_age_not_echoed(self):
        """Findings do not repeat the patient's age."""
        result = screen(request_of("lorazepam", age_years=87), KB)

        assert result.findings
        assert "87" not in str(result)


class TestPregnancyRules:
    @pytest.mark.parametrize("rule", rule_params(KB.pregnancy_rules))
    def test_fires_when_pregnant(self, rule):
        """Every drug of a pregnancy rule fires when pregnant is true."""
        assert [] == _fires_for_every_drug(
            rule, Finding.PREGNANCY, pregnant=True
        )

    @pytest.mark.parametrize("rule", rule_params(KB.pregnancy_rules))
    def test_silent_when_not_pregnant(self, rule):
        """pregnant: false gives no finding and no gap."""
        result = screen(
            request_of(drug_name(min(rule.drugs)), pregnant=False), KB
        )

        assert [] == by_rule(result, rule.id)
        assert "pregnancy screening" not in [
            e.subject for e in result.not_screened
        ]


class TestLactationRules:
    @pytest.mark.parametrize("rule", rule_params(KB.lactation_rules))
    def test_fires_when_lactating(self, rule):
        """Every drug of a lactation rule fires when lactating is true."""
        assert [] == _fires_for_every_drug(
            rule, Finding.PREGNANCY, lactating=True
        )

    @pytest.mark.parametrize("rule", rule_params(KB.lactation_rules))
    def test_missing_status_reported(self, rule):
        """Without lactation status a covered drug lists the gap."""
        result = screen(
            request_of(drug_name(min(rule.drugs)), sex=Sex.FEMALE), KB
        )

        assert "lactation screening" in [
            e.subject for e in result.not_screened
        ]
