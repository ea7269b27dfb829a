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


class TestIcd10Prefixes:
    @pytest.mark.parametrize(
        ("code", "condition_id"),
        [
            ("G70.01", "condition.myasthenia-gravis"),
            ("g7001", "condition.myasthenia-gravis"),
            ("K92.2", "condition.gastrointestinal-bleeding"),
            ("k922", "condition.gastrointestinal-bleeding"),
            ("I45.81", "condition.long-qt"),
            ("I47.21", "condition.long-qt"),
            ("H40.211", "condition.angle-closure-glaucoma"),
            ("z86.718", "condition.venous-thromboembolism"),
            ("E87.21", "condition.metabolic-acidosis"),
            ("G20.A1", "condition.parkinson-disease"),
            ("g20a1", "condition.parkinson-disease"),
            ("N18.30", "condition.chronic-kidney-disease"),
        ],
    )
    def test_code_under_prefix_matches(self, code, condition_id):
        """Dotted, undotted and lower-case codes match their category."""
        match = KB.resolve_condition("", code, "")

        assert (condition_id,) == match.conditions
        assert not match.unknown_icd10

    @pytest.mark.parametrize(
        "code",
        [
            "I44.0",  # first-degree AV block
            "H40.11",  # primary open-angle glaucoma
            "E87.29",  # other acidosis, including respiratory
            "M66.0",  # rupture of popliteal cyst
        ],
    )
    def test_sibling_code_outside_prefix_is_unknown(self, code):
        """A neighboring code that no rule is about does not match."""
        match = KB.resolve_condition("", code, "")

        assert () == match.conditions
        assert match.unknown_icd10

    @pytest.mark.parametrize(
        ("code", "condition_ids"),
        [
            (
                "I13.0",
                (
                    "condition.chronic-kidney-disease",
                    "condition.heart-failure",
                ),
            ),
            (
                "K25.0",
                (
                    "condition.gastrointestinal-bleeding",
                    "condition.peptic-ulcer-disease",
                ),
            ),
        ],
    )
    def test_code_in_two_categories_gives_both(self, code, condition_ids):
        """A combination code resolves to every condition it names."""
        assert condition_ids == KB.resolve_condition("", code, "").conditions


class TestConditionNames:
    @pytest.mark.parametrize(
        ("name", "condition_id"),
        [
            ("Mobitz II", "condition.high-grade-av-block"),
            ("complete heart block", "condition.high-grade-av-block"),
            ("Alzheimer's disease", "condition.dementia"),
            ("PARKINSON'S", "condition.parkinson-disease"),
            ("LQTS", "condition.long-qt"),
            ("DKA", "condition.metabolic-acidosis"),
            ("BPH with LUTS", "condition.benign-prostatic-hyperplasia"),
            ("narrow angle glaucoma", "condition.angle-closure-glaucoma"),
            ("history of CVA", "condition.stroke-or-tia"),
            ("hemorrhagic stroke", "condition.intracranial-hemorrhage"),
            ("s/p AAA repair", "condition.aortic-aneurysm"),
            ("G6PD deficiency", "condition.g6pd-deficiency"),
        ],
    )
    def test_synonym_resolves(self, name, condition_id):
        """Abbreviations and synonyms resolve, longest phrase first."""
        assert (condition_id,) == KB.resolve_condition(name, "", "").conditions

    @pytest.mark.parametrize(
        "name",
        [
            "first degree AV block",
            "open-angle glaucoma",
            "respiratory acidosis",
        ],
    )
    def test_milder_variant_does_not_resolve(self, name):
        """A milder condition is not mistaken for the one a rule names."""
        assert () == KB.resolve_condition(name, "", "").conditions

    def test_synonym_fires_rule(self):
        """A condition given by abbreviation fires its rules."""
        result = screen(
            request_of("Coreg", conditions=["2nd degree AV block"]), KB
        )

        [finding] = by_rule(result, "dx.beta-blockers-av-block")
        assert Finding.CONTRAINDICATED == finding.severity


class TestBeersDrugDiseaseAges:
    def test_beers_rules_start_at_65(self):
        """Every Beers drug-disease rule applies from 65, no other does."""
        beers = {
            rule.id: rule.min_age
            for rule in KB.condition_rules
            if rule.source.label == "AGS Beers Criteria 2023"
        }
        others = {
            rule.id: rule.min_age
            for rule in KB.condition_rules
            if rule.source.label != "AGS Beers Criteria 2023"
        }

        assert beers
        assert {65} == set(beers.values())
        assert {None} == set(others.values())

    @pytest.mark.parametrize(
        ("age", "fires"), [(64, False), (65, True), (90, True)]
    )
    def test_anticholinergic_in_dementia_from_65(self, age, fires):
        """Diphenhydramine with dementia is flagged from 65 on."""
        result = screen(
            request_of("Benadryl", conditions=["dementia"], age_years=age),
            KB,
        )

        findings = by_rule(result, "dx.beers-anticholinergics-dementia")
        assert fires == bool(findings)

    def test_beers_rule_silent_without_age(self):
        """Without an age, a rule for older adults does not fire."""
        result = screen(
            request_of("Benadryl", conditions=["Alzheimer disease"]), KB
        )

        assert [] == by_rule(result, "dx.beers-anticholinergics-dementia")

    @pytest.mark.parametrize("patient", [{"age_years": 30}, {}])
    def test_labeled_contraindication_ignores_age(self, patient):
        """A labeling contraindication fires at any age, or with none."""
        result = screen(
            request_of("Haldol", conditions=["Parkinson disease"], **patient),
            KB,
        )

        assert by_rule(result, "dx.haloperidol-parkinson-disease")
        assert [] == by_rule(
            result, "dx.beers-dopamine-antagonists-parkinson-disease"
        )
