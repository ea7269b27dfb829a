import logging

import pytest
import structlog
from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import load_knowledge_base
from services.cds.screening import screen

KB = load_knowledge_base()
Finding = cds_pb2.Finding
Level = cds_pb2.Risk.Level
SEVERE = cds_pb2.Allergy.Severity.SEVERE
MILD = cds_pb2.Allergy.Severity.MILD
# Patient facts that leave no patient check without its input, for tests
# of other checks.
COMPLETE = {"sex": cds_pb2.Patient.Sex.MALE, "age_years": 40, "egfr": 90}


def _request(*names, allergies=(), **patient) -> cds_pb2.ClinicalReviewRequest:
    """Build a request with medications by name and allergies by substance."""
    return cds_pb2.ClinicalReviewRequest(
        patient=cds_pb2.Patient(**patient),
        medications=[cds_pb2.Medication(name=name) for name in names],
        allergies=[
            allergy
            if isinstance(allergy, cds_pb2.Allergy)
            else cds_pb2.Allergy(substance=allergy)
            for allergy in allergies
        ],
    )


def _by_rule(result, rule_id: str) -> list[cds_pb2.Finding]:
    return [f for f in result.findings if f.rule_id == rule_id]


def _name(drug_id: str) -> str:
    return KB.drugs[drug_id].name


def _rule_params(rules) -> list:
    return [pytest.param(rule, id=rule.id) for rule in rules]


class TestInteractionRules:
    @pytest.mark.parametrize("rule", _rule_params(KB.interactions))
    def test_every_pair_of_rule_fires(self, rule):
        """Every object and precipitant pair yields the rule's finding."""
        failures = []
        pairs = [
            (object_drug, precipitant)
            for object_drug in sorted(rule.object_drugs)
            for precipitant in sorted(rule.precipitant_drugs)
            if object_drug != precipitant
        ]
        for object_drug, precipitant in pairs:
            names = [_name(object_drug), _name(precipitant)]
            findings = _by_rule(screen(_request(*names), KB), rule.id)
            expected = [(Finding.Category.DRUG_INTERACTION, rule.severity)]
            actual = [(f.category, f.severity) for f in findings]
            if expected != actual or names != list(findings[0].subjects):
                failures.append(names)

        assert pairs
        assert [] == failures

    def test_warfarin_ibuprofen_names_both(self):
        """Warfarin with ibuprofen is a bleeding-risk interaction."""
        result = screen(_request("warfarin", "ibuprofen"), KB)

        [finding] = _by_rule(result, "ddi.anticoagulants-nsaids")
        assert Finding.Category.DRUG_INTERACTION == finding.category
        assert Finding.Severity.MAJOR == finding.severity
        assert ["warfarin", "ibuprofen"] == list(finding.subjects)
        assert "bleeding" in finding.summary
        assert finding.action
        assert finding.source.citation

    def test_object_drug_comes_first(self):
        """Subjects list the object before the precipitant."""
        result = screen(_request("ibuprofen", "warfarin"), KB)

        [finding] = _by_rule(result, "ddi.anticoagulants-nsaids")
        assert ["warfarin", "ibuprofen"] == list(finding.subjects)

    def test_same_drug_twice_is_no_interaction(self):
        """Two names of one QT drug do not interact with each other."""
        result = screen(_request("citalopram", "Celexa"), KB)

        assert [] == _by_rule(result, "ddi.qt-prolonging-drugs")

    def test_pair_reported_once_per_rule(self):
        """Two QT drugs give one finding, not one per direction."""
        result = screen(_request("citalopram", "ondansetron"), KB)

        assert 1 == len(_by_rule(result, "ddi.qt-prolonging-drugs"))

    def test_unrelated_drugs_give_no_findings(self):
        """Drugs without a rule between them give no finding."""
        result = screen(_request("metformin", "lisinopril"), KB)

        assert [] == list(result.findings)


class TestMedicationNames:
    def test_brand_names_kept_as_written(self):
        """Subjects are the names exactly as the request gave them."""
        result = screen(_request("Coumadin 5mg", "Advil 200 mg"), KB)

        [finding] = _by_rule(result, "ddi.anticoagulants-nsaids")
        assert ["Coumadin 5mg", "Advil 200 mg"] == list(finding.subjects)
        assert "Coumadin 5mg contains warfarin." in finding.detail
        assert "Advil 200 mg contains ibuprofen." in finding.detail

    def test_salt_forms_are_screened(self):
        """Salt forms resolve to the ingredient and are screened."""
        result = screen(
            _request(
                "warfarin sodium 5 mg", "naproxen sodium 220 mg", **COMPLETE
            ),
            KB,
        )

        assert 1 == len(_by_rule(result, "ddi.anticoagulants-nsaids"))
        assert [] == list(result.not_screened)

    @pytest.mark.parametrize(
        ("names", "rule_id"),
        [
            (("Coumadin", "Vicoprofen"), "ddi.anticoagulants-nsaids"),
            (("methotrexate", "Bactrim DS"), "ddi.methotrexate-trimethoprim"),
            (("Bactrim DS", "warfarin"), "ddi.warfarin-cyp2c9-inhibitors"),
            (
                ("Kaletra", "simvastatin"),
                "ddi.simvastatin-lovastatin-strong-cyp3a4-inhibitors",
            ),
            (("Treximet", "phenelzine"), "ddi.triptans-maois"),
        ],
    )
    def test_combination_products_screen_ingredients(self, names, rule_id):
        """Each ingredient of a combination product is screened."""
        result = screen(_request(*names), KB)

        assert 1 == len(_by_rule(result, rule_id))

    def test_names_are_case_insensitive(self):
        """Upper- and mixed-case names are screened like lower case."""
        result = screen(_request("WARFARIN", "iBuProFeN"), KB)

        [finding] = _by_rule(result, "ddi.anticoagulants-nsaids")
        assert ["WARFARIN", "iBuProFeN"] == list(finding.subjects)

    def test_unknown_drug_reported_not_screened(self):
        """A name the vocabulary lacks is listed as not screened."""
        result = screen(
            _request("warfarin", "Xyzzyfloxacin 10 mg", **COMPLETE), KB
        )

        [entry] = result.not_screened
        assert "Xyzzyfloxacin 10 mg" == entry.subject
        assert "not recognized" in entry.reason
        assert "not screened" in entry.reason

    def test_partly_recognized_name_reported(self):
        """Words of a name that match nothing are reported."""
        result = screen(_request("ibuprofen and chamomile", **COMPLETE), KB)

        [entry] = result.not_screened
        assert "ibuprofen and chamomile" == entry.subject
        assert '"chamomile"' in entry.reason

    def test_unknown_rxnorm_reported_screened_by_name(self):
        """An unknown RxNorm code is reported and the name still screened."""
        request = _request("ibuprofen", **COMPLETE)
        request.medications.add(name="warfarin", rxnorm="99999999")

        result = screen(request, KB)

        [entry] = result.not_screened
        assert "warfarin" == entry.subject
        assert "99999999" in entry.reason
        assert "screened by its name" in entry.reason
        assert 1 == len(_by_rule(result, "ddi.anticoagulants-nsaids"))

    def test_unknown_rxnorm_and_name_not_screened(self):
        """Neither name nor code known: reported once as not screened."""
        request = _request()
        request.medications.add(name="Xyzzy", rxnorm="99999999")

        [entry] = screen(request, KB).not_screened
        assert "Xyzzy" == entry.subject
        assert "was not screened" in entry.reason

    def test_rxnorm_code_alone_is_screened(self):
        """A medication given only by RxNorm code is screened by it."""
        request = _request(**COMPLETE)
        request.medications.add(rxnorm="11289")
        request.medications.add(rxnorm="5640")

        result = screen(request, KB)

        [finding] = _by_rule(result, "ddi.anticoagulants-nsaids")
        assert ["11289", "5640"] == list(finding.subjects)
        assert [] == list(result.not_screened)


class TestAllergyClasses:
    @pytest.mark.parametrize("rule", _rule_params(KB.allergy_classes))
    def test_class_word_fires_for_members(self, rule):
        """Each member drug fires the class when the class word is given."""
        failures = []
        for drug_id in sorted(rule.members):
            for severity, expected in [
                (MILD, rule.severity),
                (SEVERE, rule.severe_reaction_severity),
            ]:
                allergy = cds_pb2.Allergy(
                    substance=rule.terms[0], severity=severity
                )
                result = screen(
                    _request(_name(drug_id), allergies=[allergy]), KB
                )
                findings = _by_rule(result, rule.id)
                actual = [(f.category, f.severity) for f in findings]
                if [(Finding.Category.DRUG_ALLERGY, expected)] != actual:
                    failures.append((drug_id, severity))

        assert rule.members
        assert [] == failures

    @pytest.mark.parametrize("rule", _rule_params(KB.allergy_classes))
    def test_member_allergy_fires_for_other_members(self, rule):
        """An allergy to one member fires for the other members."""
        allergen, *others = sorted(rule.members)
        for drug_id in others:
            result = screen(
                _request(_name(drug_id), allergies=[_name(allergen)]), KB
            )

            assert 1 == len(_by_rule(result, rule.id)), drug_id

    @pytest.mark.parametrize("rule", _rule_params(KB.cross_reactivities))
    def test_cross_reactivity_fires_lower_severity(self, rule):
        """A cross-reactive class gives its own, lower-severity finding."""
        allergy_class = next(
            c for c in KB.allergy_classes if c.id == rule.allergy_class
        )
        for drug_id in sorted(rule.members):
            for severity, expected in [
                (MILD, rule.severity),
                (SEVERE, rule.severe_reaction_severity),
            ]:
                allergy = cds_pb2.Allergy(
                    substance=allergy_class.terms[0], severity=severity
                )
                result = screen(
                    _request(_name(drug_id), allergies=[allergy]), KB
                )

                [finding] = _by_rule(result, rule.id)
                assert expected == finding.severity, drug_id
                assert allergy_class.severity > finding.severity

    def test_penicillin_allergy_and_cephalexin(self):
        """Penicillin allergy with cephalexin is a minor cross-reactivity."""
        result = screen(_request("Keflex", allergies=["penicillin"]), KB)

        [finding] = result.findings
        assert (
            "allergy.penicillin-cephalosporin-cross-reactivity"
            == finding.rule_id
        )
        assert Finding.Severity.MINOR == finding.severity
        assert ["Keflex", "penicillin"] == list(finding.subjects)

    def test_brand_allergy_maps_to_class(self):
        """An allergy recorded as a brand maps to the drug's class."""
        result = screen(_request("ampicillin", allergies=["Augmentin"]), KB)

        assert 1 == len(_by_rule(result, "allergy.penicillins"))

    def test_same_drug_allergy_fires(self):
        """A recorded allergy to the drug itself is a finding."""
        result = screen(_request("Glucophage", allergies=["metformin"]), KB)

        [finding] = result.findings
        assert "allergy.same-drug" == finding.rule_id
        assert Finding.Category.DRUG_ALLERGY == finding.category
        assert ["Glucophage", "metformin"] == list(finding.subjects)

    def test_one_finding_per_medication_and_allergy(self):
        """The drug itself wins over its class at equal severity."""
        result = screen(_request("Advil", allergies=["ibuprofen"]), KB)

        assert ["allergy.same-drug"] == [f.rule_id for f in result.findings]

    @pytest.mark.parametrize(
        "name", ["furosemide", "hydrochlorothiazide", "Lasix 40 mg"]
    )
    def test_sulfa_allergy_spares_non_antibiotics(self, name):
        """Non-antibiotic sulfonamides do not fire the sulfa class."""
        result = screen(_request(name, allergies=["sulfa"]), KB)

        assert [] == list(result.findings)

    def test_unknown_allergy_reported(self):
        """A non-drug allergy is listed as not screened."""
        result = screen(
            _request("warfarin", allergies=["peanuts"], **COMPLETE), KB
        )

        [entry] = result.not_screened
        assert "peanuts" == entry.subject
        assert "not screened" in entry.reason


class TestRenalRules:
    @pytest.mark.parametrize("rule", _rule_params(KB.renal_rules))
    def test_fires_below_threshold(self, rule):
        """Each drug of a rule fires just below the rule's upper bound."""
        egfr = rule.egfr_below - 0.5
        for drug_id in sorted(rule.drugs):
            result = screen(_request(_name(drug_id), egfr=egfr), KB)

            [finding] = _by_rule(result, rule.id)
            assert Finding.Category.RENAL == finding.category
            assert rule.severity == finding.severity
            assert [_name(drug_id)] == list(finding.subjects)

    @pytest.mark.parametrize("rule", _rule_params(KB.renal_rules))
    def test_silent_at_and_above_threshold(self, rule):
        """No finding at the upper bound or above it."""
        for egfr in (rule.egfr_below, rule.egfr_below + 10):
            for drug_id in sorted(rule.drugs):
                result = screen(_request(_name(drug_id), egfr=egfr), KB)

                assert [] == _by_rule(result, rule.id), (drug_id, egfr)

    @pytest.mark.parametrize(
        "rule",
        _rule_params(rule for rule in KB.renal_rules if rule.egfr_at_least),
    )
    def test_silent_below_lower_bound(self, rule):
        """A banded rule leaves lower eGFRs to the stricter rule."""
        drug_id = min(rule.drugs)
        result = screen(
            _request(_name(drug_id), egfr=rule.egfr_at_least - 0.5), KB
        )

        assert [] == _by_rule(result, rule.id)

    def test_metformin_contraindicated_below_30(self):
        """Metformin at eGFR 25 is contraindicated."""
        result = screen(_request("Glucophage 500 mg", egfr=25), KB)

        [finding] = result.findings
        assert "renal.metformin-egfr-below-30" == finding.rule_id
        assert Finding.Severity.CONTRAINDICATED == finding.severity
        assert "below eGFR 30" in finding.summary

    def test_patient_egfr_not_echoed(self):
        """Findings name the rule's threshold, never the patient's eGFR."""
        result = screen(_request("ibuprofen", egfr=27.3), KB)

        assert result.findings
        assert "27.3" not in str(result)

    def test_missing_egfr_reported_not_screened(self):
        """Without eGFR, renal dosing is listed as not screened."""
        result = screen(_request("metformin"), KB)

        [entry] = result.not_screened
        assert "renal dosing" == entry.subject
        assert "eGFR not given" == entry.reason

    def test_missing_egfr_silent_without_renal_drugs(self):
        """Renal dosing is not listed when no drug has a renal rule."""
        result = screen(_request("sertraline"), KB)

        assert [] == list(result.not_screened)


class TestUnavailableChecks:
    def test_unknown_condition_reported(self):
        """A condition known by neither name nor code is not screened."""
        request = _request("sertraline", **COMPLETE)
        request.conditions.add(name="zzcondition", icd10="Z99.89")

        [entry] = screen(request, KB).not_screened

        assert "zzcondition" == entry.subject
        assert "not recognized" in entry.reason

    def test_missing_patient_inputs_reported(self):
        """Renal, age and pregnancy checks without input are listed."""
        result = screen(_request("ibuprofen", "lorazepam", "warfarin"), KB)

        assert [
            "renal dosing",
            "age screening",
            "pregnancy screening",
        ] == [entry.subject for entry in result.not_screened]

    def test_male_patient_not_asked_pregnancy(self):
        """Pregnancy status is not asked of a male patient."""
        result = screen(
            _request("warfarin", sex=cds_pb2.Patient.Sex.MALE, age_years=30),
            KB,
        )

        assert [] == list(result.not_screened)


class TestRisk:
    @pytest.mark.parametrize(
        ("names", "allergies", "level"),
        [
            (("selegiline", "fluoxetine"), (), Level.CRITICAL),
            (("warfarin", "ibuprofen"), (), Level.HIGH),
            (("simvastatin", "amlodipine"), (), Level.MODERATE),
            (("cephalexin",), ("penicillin",), Level.LOW),
            (("sertraline",), (), Level.LOW),
        ],
    )
    def test_level_follows_top_severity(self, names, allergies, level):
        """The risk level maps from the most severe finding."""
        result = screen(_request(*names, allergies=allergies), KB)

        assert level == result.risk.level

    def test_factors_are_top_findings(self):
        """Factors describe the findings at the highest severity."""
        result = screen(
            _request("selegiline", "fluoxetine", "warfarin", "ibuprofen"), KB
        )

        assert [
            "fluoxetine with selegiline: risk of serotonin syndrome"
        ] == list(result.risk.factors)

    def test_no_findings_gives_low_without_factors(self):
        """No findings: low risk and nothing listed."""
        result = screen(_request("sertraline"), KB)

        assert Level.LOW == result.risk.level
        assert [] == list(result.risk.factors)

    def test_unrecognized_medication_is_a_factor(self):
        """An unscreened medication warns that risk may be underestimated."""
        result = screen(_request("Xyzzy"), KB)

        assert [
            "1 medication(s) not fully recognized, so the risk may be "
            "underestimated"
        ] == list(result.risk.factors)


class TestRecommendations:
    def test_one_per_finding_from_rules(self):
        """Each finding's action becomes a rules recommendation."""
        result = screen(_request("warfarin", "ibuprofen"), KB)

        [recommendation] = result.recommendations
        assert cds_pb2.Recommendation.Origin.RULES == recommendation.origin
        assert recommendation.text.startswith("warfarin with ibuprofen: ")
        assert result.findings[0].action in recommendation.text

    def test_unrecognized_medication_needs_review(self):
        """An unrecognized medication is to be reviewed by hand."""
        result = screen(_request("Xyzzy"), KB)

        assert [
            "Review Xyzzy by hand: the screening engine did not fully "
            "recognize it."
        ] == [r.text for r in result.recommendations]


class TestDeterminism:
    REQUEST = _request(
        "Coumadin",
        "Advil",
        "citalopram",
        "ondansetron",
        "simvastatin",
        "clarithromycin",
        "Glucophage",
        allergies=["penicillin", "sulfa"],
        egfr=25,
    )

    def test_same_request_same_result(self):
        """Screening twice gives identical results."""
        first = screen(self.REQUEST, KB)
        second = screen(self.REQUEST, KB)

        assert first == second

    def test_findings_sorted_by_severity(self):
        """Findings come most severe first."""
        severities = [f.severity for f in screen(self.REQUEST, KB).findings]

        assert sorted(severities, reverse=True) == severities
        assert Finding.Severity.CONTRAINDICATED == severities[0]

    def test_equal_severity_sorted_by_rule(self):
        """Within a severity, findings are ordered by category and rule."""
        findings = screen(self.REQUEST, KB).findings
        keys = [(-f.severity, f.category, f.rule_id) for f in findings]

        assert sorted(keys) == keys

    def test_screening_logs_nothing(self, caplog):
        """Screening writes no log lines, because the request is PHI."""
        caplog.set_level(logging.DEBUG)
        with structlog.testing.capture_logs() as captured:
            screen(self.REQUEST, KB)

        assert [] == captured
        assert [] == caplog.records


class TestRepeatedItems:
    def test_repeated_medication_finding_once(self):
        """The same pair listed twice gives one finding, not four."""
        result = screen(
            _request(
                "warfarin",
                "ibuprofen",
                "warfarin",
                "ibuprofen",
                age_years=40,
                sex=cds_pb2.Patient.Sex.MALE,
                egfr=90,
            ),
            KB,
        )

        interactions = [
            f
            for f in result.findings
            if f.rule_id == "ddi.anticoagulants-nsaids"
        ]
        assert 1 == len(interactions)

    def test_repeated_unknown_name_listed_once(self):
        result = screen(_request("zzunknown", "zzunknown"), KB)

        assert 1 == len(
            [gap for gap in result.not_screened if gap.subject == "zzunknown"]
        )


class TestCodeConflict:
    def test_code_naming_another_drug_is_flagged(self):
        """A name and a code that disagree are both screened and reported."""
        code = next(
            drug.rxnorm
            for drug in KB.drugs.values()
            if drug.rxnorm and drug.name == "warfarin"
        )
        request = _request(age_years=40, sex=cds_pb2.Patient.Sex.MALE, egfr=90)
        request.medications.add(name="ibuprofen", rxnorm=code)

        result = screen(request, KB)

        [gap] = [g for g in result.not_screened if g.subject == "ibuprofen"]
        assert "warfarin" in gap.reason
        assert "both were screened" in gap.reason
