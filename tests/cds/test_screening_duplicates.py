"""Duplicate therapy: shared ingredients and shared classes."""

import pytest

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

SAME = "dup.same-ingredient"


class TestClassDuplicates:
    @pytest.mark.parametrize("rule", rule_params(KB.duplicate_rules))
    def test_every_pair_of_members_fires(self, rule):
        """Each member with the next one in the class gives the finding."""
        members = sorted(rule.members)
        assert len(members) >= 2
        failures = []
        for first, second in zip(members, members[1:], strict=False):
            names = [drug_name(first), drug_name(second)]
            findings = by_rule(
                screen(request_of(*names, **COMPLETE), KB), rule.id
            )
            if [(Finding.DUPLICATE_THERAPY, names)] != [
                (f.category, list(f.subjects)) for f in findings
            ]:
                failures.append(names)

        assert [] == failures

    @pytest.mark.parametrize("rule", rule_params(KB.duplicate_rules))
    def test_one_member_is_no_duplicate(self, rule):
        """A single member of the class gives no finding."""
        result = screen(request_of(drug_name(min(rule.members))), KB)

        assert [] == by_rule(result, rule.id)

    def test_three_members_one_finding(self):
        """Three NSAIDs give one finding naming all three."""
        result = screen(
            request_of("ibuprofen", "naproxen", "meloxicam", **COMPLETE), KB
        )

        [finding] = by_rule(result, "dup.nsaids")
        assert ["ibuprofen", "naproxen", "meloxicam"] == list(finding.subjects)


class TestSameIngredient:
    def test_brand_and_generic(self):
        """Coumadin and warfarin are the same ingredient."""
        result = screen(request_of("Coumadin", "warfarin", **COMPLETE), KB)

        [finding] = by_rule(result, SAME)
        assert ["Coumadin", "warfarin"] == list(finding.subjects)
        assert "warfarin" in finding.detail
        assert [] == by_rule(result, "dup.anticoagulants")

    def test_combination_product_shares_ingredient(self):
        """A combination product and a single ingredient overlap."""
        product = next(
            p for p in KB.products.values() if len(p.ingredients) > 1
        )
        ingredient = drug_name(product.ingredients[0])

        result = screen(request_of(product.name, ingredient), KB)

        [finding] = by_rule(result, SAME)
        assert [product.name, ingredient] == list(finding.subjects)

    def test_different_drugs_no_finding(self):
        """Different ingredients give no same-ingredient finding."""
        result = screen(request_of("warfarin", "metformin"), KB)

        assert [] == by_rule(result, SAME)
