import json
from pathlib import Path

import pytest

from services.cds.knowledge_base import (
    KNOWLEDGE_DIR,
    SEVERITIES,
    load_knowledge_base,
    name_words,
)

DRUG_FILE = json.loads((KNOWLEDGE_DIR / "drugs.json").read_text())
MANIFEST = json.loads((KNOWLEDGE_DIR / "manifest.json").read_text())


def _drug_names() -> list:
    return [
        pytest.param(name, drug["id"], id=f"{drug['id']}:{name}")
        for drug in DRUG_FILE["drugs"]
        for name in [
            drug["name"],
            *drug.get("brands", []),
            *drug.get("synonyms", []),
        ]
    ]


def _product_names() -> list:
    return [
        pytest.param(
            name,
            tuple(sorted(product["ingredients"])),
            id=f"{product['id']}:{name}",
        )
        for product in DRUG_FILE["products"]
        for name in [product["name"], *product.get("synonyms", [])]
    ]


def _edit(directory: Path, module: str, change) -> None:
    """Apply `change` to the parsed JSON of one knowledge file."""
    path = directory / f"{module}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _entry(entries: list[dict], entry_id: str) -> dict:
    return next(entry for entry in entries if entry["id"] == entry_id)


def _pairs_in_several_rules(kb) -> dict[tuple[str, str], list[str]]:
    """Return each drug pair that two or more interaction rules cover.

    A pair is unordered, so a rule from A to B and another from B to A
    cover the same pair. A drug paired with itself is no interaction.
    """
    rules_by_pair: dict[tuple[str, str], set[str]] = {}
    for rule in kb.interactions:
        for object_drug in rule.object_drugs:
            for precipitant in rule.precipitant_drugs:
                if object_drug == precipitant:
                    continue
                pair = tuple(sorted((object_drug, precipitant)))
                rules_by_pair.setdefault(pair, set()).add(rule.id)

    return {
        pair: sorted(rule_ids)
        for pair, rule_ids in sorted(rules_by_pair.items())
        if len(rule_ids) > 1
    }


class TestLoadKnowledgeBase:
    def test_version_comes_from_manifest(self, kb):
        """The knowledge base carries the manifest's version."""
        assert MANIFEST["version"] == kb.version
        assert kb.description

    def test_loads_once_per_directory(self, kb):
        """Loading the same directory again returns the same object."""
        assert kb is load_knowledge_base()
        assert kb is load_knowledge_base(KNOWLEDGE_DIR)

    def test_every_entry_has_id_and_source(self, kb):
        """Every class, drug, product and rule is cited."""
        entries = [
            *kb.classes.values(),
            *kb.drugs.values(),
            *kb.products.values(),
            *kb.interactions,
            *kb.allergy_classes,
            *kb.cross_reactivities,
            kb.same_drug_allergy,
            *kb.renal_rules,
        ]

        for entry in entries:
            assert entry.id, entry
            assert entry.source.label, entry.id
            assert entry.source.citation, entry.id

    def test_includes_fifteen_onc_interactions(self, kb):
        """The fifteen ONC high-priority pairs are all present."""
        onc = [
            rule
            for rule in kb.interactions
            if rule.source.label == "ONC high-priority drug-drug interactions"
        ]

        assert 15 == len(onc)
        assert all("Phansalkar" in rule.source.citation for rule in onc)

    def test_class_rule_expands_to_members(self, kb):
        """A class named by a rule stands for every drug of the class."""
        rule = next(
            rule
            for rule in kb.interactions
            if rule.id == "ddi.anticoagulants-nsaids"
        )

        assert kb.class_members("class.anticoagulant") == rule.object_drugs
        assert kb.class_members("class.nsaid") == rule.precipitant_drugs
        assert "drug.ibuprofen" in rule.precipitant_drugs
        assert "drug.warfarin" in rule.object_drugs

    def test_no_pair_in_two_rules(self, kb):
        """No drug pair is covered by two interaction rules.

        Two rules on one pair report the same combination twice, so a
        second effect of a pair belongs in the text of its one rule.
        """
        assert {} == _pairs_in_several_rules(kb)

    def test_repeated_pair_is_reported(self, knowledge_copy):
        """The pair check finds a pair that a second rule repeats."""

        def repeat_pair(data):
            rule = dict(_entry(data["interactions"], "ddi.digoxin-amiodarone"))
            rule["id"] = "ddi.amiodarone-digoxin-copy"
            rule["object"] = {"drugs": ["drug.amiodarone"]}
            rule["precipitant"] = {"drugs": ["drug.digoxin"]}
            data["interactions"].append(rule)

        _edit(knowledge_copy, "interactions", repeat_pair)

        repeated = _pairs_in_several_rules(load_knowledge_base(knowledge_copy))

        assert {
            ("drug.amiodarone", "drug.digoxin"): [
                "ddi.amiodarone-digoxin-copy",
                "ddi.digoxin-amiodarone",
            ]
        } == repeated

    def test_rxnorm_codes_are_numeric(self, kb):
        """Every RxNorm code in the vocabulary is a numeric RXCUI."""
        for code in kb.rxnorm_codes:
            assert code.isdigit(), code


class TestLoadErrors:
    def test_missing_source_names_file_and_entry(self, knowledge_copy):
        """A drug without a source is rejected by file and id."""
        _edit(
            knowledge_copy,
            "drugs",
            lambda data: _entry(data["drugs"], "drug.warfarin").pop("source"),
        )

        with pytest.raises(
            ValueError,
            match=r"^drugs\.json: drug\.warfarin: 'source' is missing",
        ):
            load_knowledge_base(knowledge_copy)

    def test_missing_id_names_position(self, knowledge_copy):
        """An entry without an id is rejected by its position."""
        _edit(
            knowledge_copy,
            "renal",
            lambda data: data["renal_rules"][1].pop("id"),
        )

        with pytest.raises(ValueError, match=r"renal\.json: entry #1: 'id'"):
            load_knowledge_base(knowledge_copy)

    def test_source_without_citation_is_rejected(self, knowledge_copy):
        """A source needs a citation, not only a label."""
        _edit(
            knowledge_copy,
            "interactions",
            lambda data: data["interactions"][0]["source"].pop("citation"),
        )

        with pytest.raises(ValueError, match="'citation' must be"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_class_in_rule(self, knowledge_copy):
        """A rule that names an undefined class is rejected."""

        def misspell(data):
            rule = _entry(data["interactions"], "ddi.anticoagulants-nsaids")
            rule["precipitant"] = {"classes": ["class.nsiad"]}

        _edit(knowledge_copy, "interactions", misspell)

        with pytest.raises(
            ValueError,
            match=r"interactions\.json: ddi\.anticoagulants-nsaids: "
            r"precipitant: class 'class\.nsiad'",
        ):
            load_knowledge_base(knowledge_copy)

    def test_unknown_drug_in_renal_rule(self, knowledge_copy):
        """A renal rule that names an undefined drug is rejected."""
        _edit(
            knowledge_copy,
            "renal",
            lambda data: data["renal_rules"][0].update(
                drugs={"drugs": ["drug.metformine"]}
            ),
        )

        with pytest.raises(ValueError, match="'drug.metformine' is not in"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_drug_class_on_drug(self, knowledge_copy):
        """A drug that belongs to an undefined class is rejected."""
        _edit(
            knowledge_copy,
            "drugs",
            lambda data: _entry(data["drugs"], "drug.ibuprofen").update(
                classes=["class.painkiller"]
            ),
        )

        with pytest.raises(ValueError, match="'class.painkiller' is not"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_ingredient_in_product(self, knowledge_copy):
        """A product whose ingredient is not a drug is rejected."""
        _edit(
            knowledge_copy,
            "drugs",
            lambda data: data["products"][0]["ingredients"].append(
                "drug.unobtainium"
            ),
        )

        with pytest.raises(ValueError, match="'drug.unobtainium'"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_allergy_class_in_cross_reactivity(self, knowledge_copy):
        """A cross-reactivity must name a defined allergy class."""
        _edit(
            knowledge_copy,
            "allergy_classes",
            lambda data: data["cross_reactivities"][0].update(
                allergy_class="allergy.unknown"
            ),
        )

        with pytest.raises(ValueError, match="'allergy.unknown'"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_field_is_rejected(self, knowledge_copy):
        """A misspelled field is an error, not silently ignored."""
        _edit(
            knowledge_copy,
            "interactions",
            lambda data: data["interactions"][0].update(severty="MAJOR"),
        )

        with pytest.raises(ValueError, match="unknown field.*severty"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_severity_is_rejected(self, knowledge_copy):
        """Severities must be names of Finding.Severity."""
        _edit(
            knowledge_copy,
            "interactions",
            lambda data: data["interactions"][0].update(severity="SEVERE"),
        )

        with pytest.raises(ValueError, match="'severity' must be one of"):
            load_knowledge_base(knowledge_copy)

    def test_duplicate_id_is_rejected(self, knowledge_copy):
        """Ids are unique across all knowledge files."""
        _edit(
            knowledge_copy,
            "renal",
            lambda data: data["renal_rules"][1].update(
                id="ddi.anticoagulants-nsaids"
            ),
        )

        with pytest.raises(ValueError, match="duplicate id"):
            load_knowledge_base(knowledge_copy)

    def test_name_used_twice_is_rejected(self, knowledge_copy):
        """Two drugs cannot share a brand name."""
        _edit(
            knowledge_copy,
            "drugs",
            lambda data: _entry(data["drugs"], "drug.naproxen")[
                "brands"
            ].append("ADVIL"),
        )

        with pytest.raises(ValueError, match="'ADVIL' is already used"):
            load_knowledge_base(knowledge_copy)

    def test_inverted_egfr_range_is_rejected(self, knowledge_copy):
        """A renal rule's lower eGFR bound must be below its upper one."""
        _edit(
            knowledge_copy,
            "renal",
            lambda data: data["renal_rules"][1].update(egfr_at_least=50),
        )

        with pytest.raises(ValueError, match="egfr_at_least < egfr_below"):
            load_knowledge_base(knowledge_copy)

    def test_invalid_json_names_file(self, knowledge_copy):
        """A file that is not JSON is reported by name."""
        (knowledge_copy / "renal.json").write_text("{")

        with pytest.raises(ValueError, match=r"^renal\.json: invalid JSON"):
            load_knowledge_base(knowledge_copy)

    def test_missing_file_names_file(self, knowledge_copy):
        """A missing module file is reported by name."""
        (knowledge_copy / "interactions.json").unlink()

        with pytest.raises(ValueError, match="interactions.json: file not"):
            load_knowledge_base(knowledge_copy)

    def test_non_https_url_is_rejected(self, knowledge_copy):
        """Source links must use https."""
        _edit(
            knowledge_copy,
            "interactions",
            lambda data: data["interactions"][0]["source"].update(
                url="http://example.org"
            ),
        )

        with pytest.raises(ValueError, match="must start with https://"):
            load_knowledge_base(knowledge_copy)


class TestRuleFileErrors:
    def test_dose_unit_unknown(self, knowledge_copy):
        """A dose limit in a unit the engine cannot convert is rejected."""
        _edit(
            knowledge_copy,
            "doses",
            lambda data: data["dose_limits"][0]["max_daily"].update(
                unit="tablets"
            ),
        )

        with pytest.raises(ValueError, match="'tablets'"):
            load_knowledge_base(knowledge_copy)

    def test_dose_route_unknown(self, knowledge_copy):
        _edit(
            knowledge_copy,
            "doses",
            lambda data: data["dose_limits"][0].update(routes=["sideways"]),
        )

        with pytest.raises(ValueError, match="'sideways'"):
            load_knowledge_base(knowledge_copy)

    def test_unknown_condition_in_rule(self, knowledge_copy):
        _edit(
            knowledge_copy,
            "conditions",
            lambda data: data["contraindications"][0].update(
                condition="condition.hart-failure"
            ),
        )

        with pytest.raises(ValueError, match="condition.hart-failure"):
            load_knowledge_base(knowledge_copy)

    def test_age_rule_without_bounds(self, knowledge_copy):
        """An age rule must give a lower or an upper age."""

        def unbound(data):
            data["age_rules"][0].pop("min_age", None)
            data["age_rules"][0].pop("below_age", None)

        _edit(knowledge_copy, "age", unbound)

        with pytest.raises(ValueError, match="age"):
            load_knowledge_base(knowledge_copy)

    def test_duplicate_class_unknown(self, knowledge_copy):
        _edit(
            knowledge_copy,
            "duplicate_therapy",
            lambda data: data["duplicate_classes"][0].update(
                **{"class": "class.nsiad"}
            ),
        )

        with pytest.raises(ValueError, match="class.nsiad"):
            load_knowledge_base(knowledge_copy)


@pytest.mark.parametrize(
    "path",
    sorted(KNOWLEDGE_DIR.glob("*.json")),
    ids=lambda path: path.name,
)
def test_files_are_in_canonical_format(path):
    """Each file keeps one format, so that edits merge line by line."""
    text = path.read_text(encoding="utf-8")
    canonical = json.dumps(json.loads(text), indent=2, ensure_ascii=False)

    assert canonical + "\n" == text, (
        f"{path.name} is not in the canonical format: rewrite it with "
        "json.dumps(data, indent=2, ensure_ascii=False) and a final newline"
    )


class TestResolveName:
    @pytest.mark.parametrize(("name", "drug_id"), _drug_names())
    def test_every_drug_name_resolves(self, kb, name, drug_id):
        """Each ingredient, brand and synonym gives exactly its drug."""
        match = kb.resolve_name(name)

        assert (drug_id,) == match.drugs
        assert () == match.unrecognized

    @pytest.mark.parametrize(("name", "ingredients"), _product_names())
    def test_products_give_all_ingredients(self, kb, name, ingredients):
        """A combination product resolves to every one of its ingredients."""
        match = kb.resolve_name(name)

        assert ingredients == match.drugs
        assert () == match.unrecognized

    @pytest.mark.parametrize(
        ("name", "drug_id"),
        [
            ("WARFARIN", "drug.warfarin"),
            ("coumadin", "drug.warfarin"),
            ("cOuMaDiN", "drug.warfarin"),
            ("ST. JOHN'S WORT", "drug.st-johns-wort"),
        ],
    )
    def test_case_insensitive(self, kb, name, drug_id):
        """Names match whatever their case."""
        assert (drug_id,) == kb.resolve_name(name).drugs

    @pytest.mark.parametrize(
        ("name", "drug_id"),
        [
            ("metoprolol succinate", "drug.metoprolol"),
            ("metoprolol succinate ER 50 mg", "drug.metoprolol"),
            ("naproxen sodium 220 mg", "drug.naproxen"),
            ("lithium carbonate ER 300mg", "drug.lithium"),
            ("diltiazem hydrochloride", "drug.diltiazem"),
            ("sertraline HCl", "drug.sertraline"),
            ("esomeprazole magnesium", "drug.esomeprazole"),
            ("metoprolol tartrate 25 mg", "drug.metoprolol"),
            ("amlodipine besylate 10 mg", "drug.amlodipine"),
            ("losartan potassium", "drug.losartan"),
            ("olmesartan medoxomil", "drug.olmesartan"),
            ("doxycycline hyclate 100 mg", "drug.doxycycline"),
            ("hydroxyzine pamoate 25 mg", "drug.hydroxyzine"),
            ("fluticasone propionate nasal spray", "drug.fluticasone"),
            ("divalproex sodium DR 500 mg", "drug.valproic-acid"),
            ("mycophenolate mofetil 500 mg", "drug.mycophenolic-acid"),
            ("gadoterate meglumine", "drug.gadoterate"),
            ("buprenorphine hydrochloride", "drug.buprenorphine"),
        ],
    )
    def test_salt_forms_give_the_ingredient(self, kb, name, drug_id):
        """A salt form resolves to its base ingredient."""
        match = kb.resolve_name(name)

        assert (drug_id,) == match.drugs
        assert () == match.unrecognized

    def test_dose_form_and_frequency_ignored(self, kb):
        """Strength, form, route and frequency words are not drug names."""
        match = kb.resolve_name("Coumadin 5 mg tablet by mouth nightly")

        assert ("drug.warfarin",) == match.drugs
        assert () == match.unrecognized

    @pytest.mark.parametrize(
        ("name", "drugs"),
        [
            (
                "amoxicillin/clavulanate 875-125 mg",
                ("drug.amoxicillin", "drug.clavulanate"),
            ),
            (
                "sulfamethoxazole-trimethoprim DS",
                ("drug.sulfamethoxazole", "drug.trimethoprim"),
            ),
            ("Bactrim DS", ("drug.sulfamethoxazole", "drug.trimethoprim")),
            ("Tylenol #3", ("drug.acetaminophen", "drug.codeine")),
            (
                "lisinopril-HCTZ",
                ("drug.hydrochlorothiazide", "drug.lisinopril"),
            ),
            (
                "Augmentin 875 mg",
                ("drug.amoxicillin", "drug.clavulanate"),
            ),
            (
                "Advair Diskus 250/50",
                ("drug.fluticasone", "drug.salmeterol"),
            ),
            (
                "Symbicort 160/4.5 inhaler",
                ("drug.budesonide", "drug.formoterol"),
            ),
            (
                "Suboxone 8 mg-2 mg film",
                ("drug.buprenorphine", "drug.naloxone"),
            ),
            (
                "Humulin 70/30",
                ("drug.insulin-isophane", "drug.insulin-regular"),
            ),
            (
                "Tribenzor 40-10-25",
                (
                    "drug.amlodipine",
                    "drug.hydrochlorothiazide",
                    "drug.olmesartan",
                ),
            ),
            (
                "Recarbrio",
                ("drug.cilastatin", "drug.imipenem", "drug.relebactam"),
            ),
        ],
    )
    def test_combinations_give_every_ingredient(self, kb, name, drugs):
        """Ingredients written together, or a product, give all of them."""
        assert drugs == kb.resolve_name(name).drugs

    def test_longest_name_wins(self, kb):
        """Claritin-D is the combination, Claritin the single ingredient."""
        assert ("drug.loratadine",) == kb.resolve_name("Claritin").drugs
        assert (
            "drug.loratadine",
            "drug.pseudoephedrine",
        ) == kb.resolve_name("Claritin-D 12 hour").drugs

    @pytest.mark.parametrize(
        ("name", "drug_id"),
        [
            ("Benicar", "drug.olmesartan"),
            ("Novolin N", "drug.insulin-isophane"),
            ("Humulin R U-100", "drug.insulin-regular"),
            ("Seroquel XR 300 mg", "drug.quetiapine"),
            ("Omnipaque 350", "drug.iohexol"),
        ],
    )
    def test_brand_alone_is_the_ingredient(self, kb, name, drug_id):
        """A brand with strength or release words gives one ingredient."""
        match = kb.resolve_name(name)

        assert (drug_id,) == match.drugs
        assert () == match.unrecognized

    def test_unknown_words_are_reported(self, kb):
        """Words that match no drug come back as unrecognized."""
        match = kb.resolve_name("ibuprofen and chamomile")

        assert ("drug.ibuprofen",) == match.drugs
        assert ("chamomile",) == match.unrecognized

    def test_unknown_name_gives_nothing(self, kb):
        """A name the vocabulary lacks resolves to no drug."""
        match = kb.resolve_name("Xyzzyfloxacin 10 mg")

        assert () == match.drugs
        assert ("xyzzyfloxacin",) == match.unrecognized


class TestResolveRxnorm:
    def test_every_drug_code_resolves(self, kb):
        """Each drug's RxNorm code gives that drug."""
        coded = [drug for drug in kb.drugs.values() if drug.rxnorm]

        assert coded
        for drug in coded:
            assert (drug.id,) == kb.resolve_rxnorm(drug.rxnorm)

    @pytest.mark.parametrize(
        ("code", "drug_id"),
        [
            ("11289", "drug.warfarin"),
            ("6809", "drug.metformin"),
            ("29046", "drug.lisinopril"),
            ("1202", "drug.atenolol"),
            ("1819", "drug.buprenorphine"),
            ("5489", "drug.hydrocodone"),
        ],
    )
    def test_well_known_codes(self, kb, code, drug_id):
        """Drugs resolve from their RxNorm ingredient codes."""
        assert (drug_id,) == kb.resolve_rxnorm(code)

    def test_every_code_cites_its_source(self, kb):
        """Each RxNorm code is named, with its source, in the citation."""
        coded = [
            entry
            for entry in [*kb.drugs.values(), *kb.products.values()]
            if entry.rxnorm
        ]

        for entry in coded:
            assert f"RxNorm code {entry.rxnorm} " in entry.source.citation, (
                entry.id
            )

    def test_product_code_gives_ingredients(self, kb):
        """A combination's code resolves to all of its ingredients."""
        assert (
            "drug.sulfamethoxazole",
            "drug.trimethoprim",
        ) == tuple(sorted(kb.resolve_rxnorm("10831")))

    def test_unknown_code_gives_nothing(self, kb):
        """A code the vocabulary lacks resolves to no drug."""
        assert () == kb.resolve_rxnorm("99999999")


class TestResolveAllergy:
    @pytest.mark.parametrize(
        ("substance", "allergy_class"),
        [
            ("penicillin", "allergy.penicillins"),
            ("Penicillins", "allergy.penicillins"),
            ("PCN", "allergy.penicillins"),
            ("sulfa", "allergy.sulfonamide-antibiotics"),
            ("Sulfa drugs", "allergy.sulfonamide-antibiotics"),
            ("cephalosporins", "allergy.cephalosporins"),
            ("NSAIDs", "allergy.nsaids"),
            ("sulfa allergy", "allergy.sulfonamide-antibiotics"),
            ("sulfonamide antibiotic", "allergy.sulfonamide-antibiotics"),
            ("non-steroidal anti-inflammatory drugs", "allergy.nsaids"),
            ("carbapenems", "allergy.carbapenems"),
            ("narcotics", "allergy.opioids"),
            ("opiates", "allergy.opiates"),
            ("contrast dye", "allergy.iodinated-contrast"),
            ("IV contrast", "allergy.iodinated-contrast"),
            ("iodine contrast dye", "allergy.iodinated-contrast"),
            ("gadolinium", "allergy.gadolinium-contrast"),
            ("MRI contrast", "allergy.gadolinium-contrast"),
        ],
    )
    def test_class_words_give_the_class(self, kb, substance, allergy_class):
        """A class word maps to its allergy class without any drug."""
        match = kb.resolve_allergy(substance)

        assert (allergy_class,) == match.allergy_classes
        assert () == match.drugs

    def test_every_class_term_resolves(self, kb):
        """Each term listed for an allergy class gives that class."""
        for allergy_class in kb.allergy_classes:
            for term in allergy_class.terms:
                assert (allergy_class.id,) == kb.resolve_allergy(
                    term
                ).allergy_classes, term

    def test_member_drug_gives_its_class(self, kb):
        """An allergy to amoxicillin is an allergy to the penicillins."""
        match = kb.resolve_allergy("amoxicillin")

        assert ("allergy.penicillins",) == match.allergy_classes
        assert ("drug.amoxicillin",) == match.drugs

    @pytest.mark.parametrize("substance", ["iodine", "shellfish"])
    def test_iodine_is_not_a_contrast_allergy(self, kb, substance):
        """Iodine and shellfish allergies do not predict contrast reactions."""
        match = kb.resolve_allergy(substance)

        assert () == match.allergy_classes
        assert (substance,) == match.unrecognized

    def test_opiate_allergy_gives_both_opioid_classes(self, kb):
        """Codeine gives the opiate and opioid classes, fentanyl only one."""
        codeine = kb.resolve_allergy("codeine")
        fentanyl = kb.resolve_allergy("fentanyl")

        assert (
            "allergy.opiates",
            "allergy.opioids",
        ) == codeine.allergy_classes
        assert ("allergy.opioids",) == fentanyl.allergy_classes

    def test_unknown_substance_is_reported(self, kb):
        """A non-drug allergy matches nothing and is reported."""
        match = kb.resolve_allergy("peanuts")

        assert () == match.allergy_classes
        assert () == match.drugs
        assert ("peanuts",) == match.unrecognized


def _allergy_class(kb, allergy_id: str):
    return next(c for c in kb.allergy_classes if c.id == allergy_id)


def _cross_reactivity(kb, rule_id: str):
    return next(c for c in kb.cross_reactivities if c.id == rule_id)


class TestAllergyClassData:
    def test_every_opioid_has_a_chemical_class(self, kb):
        """Each opioid is a phenanthrene or a cross-reactive synthetic."""
        opiates = _allergy_class(kb, "allergy.opiates").members
        synthetic = _cross_reactivity(
            kb, "allergy.opiate-synthetic-opioid-cross-reactivity"
        ).members

        assert frozenset() == opiates & synthetic
        assert kb.class_members("class.opioid") == opiates | synthetic

    def test_opioid_severities_are_graded(self, kb):
        """Severity falls from opiate to any opioid to another class."""
        opiates = _allergy_class(kb, "allergy.opiates")
        opioids = _allergy_class(kb, "allergy.opioids")
        synthetic = _cross_reactivity(
            kb, "allergy.opiate-synthetic-opioid-cross-reactivity"
        )

        assert opiates.text.severity > opioids.text.severity
        assert opioids.text.severity > synthetic.text.severity

    def test_contrast_classes_do_not_overlap(self, kb):
        """Iodinated and gadolinium-based agents are separate classes."""
        iodinated = _allergy_class(kb, "allergy.iodinated-contrast").members
        gadolinium = _allergy_class(kb, "allergy.gadolinium-contrast").members

        assert {
            "drug.iohexol",
            "drug.iopamidol",
            "drug.iodixanol",
        } <= iodinated
        assert "drug.gadobutrol" in gadolinium
        assert frozenset() == iodinated & gadolinium

    def test_sulfa_spares_non_antibiotic_sulfonamides(self, kb):
        """Loop and thiazide diuretics are not in the sulfa class."""
        sulfa = _allergy_class(kb, "allergy.sulfonamide-antibiotics").members
        diuretics = kb.class_members("class.loop-diuretic") | kb.class_members(
            "class.thiazide-diuretic"
        )

        assert "drug.furosemide" in diuretics
        assert frozenset() == sulfa & diuretics


@pytest.mark.parametrize(
    ("class_id", "drug_id"),
    [
        ("class.beta-blocker", "drug.metoprolol"),
        ("class.beta-blocker", "drug.carvedilol"),
        ("class.calcium-channel-blocker", "drug.amlodipine"),
        ("class.loop-diuretic", "drug.furosemide"),
        ("class.thiazide-diuretic", "drug.chlorthalidone"),
        ("class.potassium-sparing-diuretic", "drug.spironolactone"),
        ("class.sulfonylurea", "drug.glipizide"),
        ("class.macrolide", "drug.azithromycin"),
        ("class.fluoroquinolone", "drug.levofloxacin"),
        ("class.azole-antifungal", "drug.fluconazole"),
        ("class.antipsychotic", "drug.quetiapine"),
        ("class.antipsychotic", "drug.haloperidol"),
        ("class.carbapenem", "drug.meropenem"),
        ("class.opioid", "drug.buprenorphine"),
        ("class.benzodiazepine", "drug.triazolam"),
        ("class.statin", "drug.pitavastatin"),
        ("class.snri", "drug.levomilnacipran"),
        ("class.insulin", "drug.insulin-glargine"),
        ("class.iodinated-contrast", "drug.iohexol"),
        ("class.gadolinium-contrast", "drug.gadobutrol"),
    ],
)
def test_drug_belongs_to_class(kb, class_id, drug_id):
    """Class-level rules reach the drugs that clinicians expect."""
    assert drug_id in kb.class_members(class_id)


class TestNameWords:
    def test_splits_and_folds_case(self):
        """Punctuation separates words and case is folded."""
        assert ("amoxicillin", "clavulanate", "875") == name_words(
            "Amoxicillin/Clavulanate-875"
        )

    def test_drops_apostrophes(self):
        """Apostrophes join the letters around them."""
        assert ("st", "johns", "wort") == name_words("St. John’s Wort")


def test_severities_are_finding_severities():
    """The severity names in the files are the proto's severity names."""
    assert ["INFO", "MINOR", "MODERATE", "MAJOR", "CONTRAINDICATED"] == list(
        SEVERITIES
    )
