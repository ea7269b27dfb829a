"""The drug vocabulary of drugs.json, and how names are matched to it.

Names match as whole words, case-insensitively, longest phrase first, and
never approximately: a word that matches nothing is reported, not guessed.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.cds.knowledge_entries import Entry, Source, entry_list

# Words of a medication or allergy text that name no drug: units, dose
# forms, routes, release types, frequencies, salts and filler. A name is
# only partly recognized when words outside this set are left unmatched.
IGNORED_WORDS = frozenset(
    """
    mg mcg ug g gm gram grams kg ml l meq mmol unit units iu hr hrs h hour
    hours min tablet tablets tab tabs capsule capsules cap caps solution
    suspension syrup elixir liquid injection injectable inj infusion iv im sc
    subq sq po pr sl intravenous intramuscular subcutaneous sublingual oral
    orally topical transdermal patch cream ointment gel lotion drops spray
    nasal inhaler inhalation nebulizer powder suppository rectal vaginal
    ophthalmic otic lozenge chewable film vial ampule pen kit odt
    disintegrating er xr xl sr cr la dr ec ir extended delayed immediate
    controlled sustained modified release enteric coated daily bid tid qid
    qd qhs hs qam qpm prn once twice weekly monthly every each day days night
    nightly morning evening bedtime needed as at by mouth per take and with
    plus in of the for to or strength extra regular maximum max low dose baby
    adult children childrens pediatric junior ds ss sodium potassium calcium
    magnesium hydrochloride hcl hydrobromide hbr sulfate sulphate succinate
    tartrate maleate mesylate besylate citrate acetate phosphate fumarate
    bromide chloride carbonate bicarbonate nitrate dihydrate monohydrate
    trihydrate hyclate bitartrate tromethamine medoxomil anhydrous generic
    brand otc
    allergy allergies allergic intolerance sensitivity
    """.split()
)
_DOSE_WORD = re.compile(r"\d+[a-z]*|q\d+h")
_WORD = re.compile(r"[^\W_]+")


def name_words(text: str) -> tuple[str, ...]:
    """Split a drug name into case-folded words, as the vocabulary is keyed.

    Apostrophes are dropped ("St. John's" gives "st", "johns") and every
    other non-alphanumeric character separates words.
    """
    folded = text.casefold().replace("'", "").replace("\u2019", "")

    return tuple(_WORD.findall(folded))


def _is_ignored(word: str) -> bool:
    return (
        word in IGNORED_WORDS
        or len(word) == 1
        or _DOSE_WORD.fullmatch(word) is not None
    )


@dataclass(frozen=True)
class DrugClass:
    id: str
    name: str
    source: Source


@dataclass(frozen=True)
class Drug:
    """One ingredient of the vocabulary."""

    id: str
    name: str
    rxnorm: str
    classes: frozenset[str]
    source: Source


@dataclass(frozen=True)
class Product:
    """A combination product, resolved to all of its ingredients."""

    id: str
    name: str
    rxnorm: str
    ingredients: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class NameMatch:
    """Drug ids found in a name, and the words that matched nothing."""

    drugs: tuple[str, ...]
    unrecognized: tuple[str, ...]


def scan_phrases(
    words: tuple[str, ...],
    indexes: tuple[Mapping[tuple[str, ...], Any], ...],
    max_words: int,
) -> tuple[list[set[Any]], tuple[str, ...]]:
    """Match words against phrase indexes, longest phrase first.

    Return, for each index, the values of the phrases found in it, and the
    words that matched nothing and are not ignored words. At equal length
    an earlier index wins over a later one.
    """
    found: list[set[Any]] = [set() for _ in indexes]
    leftover: list[str] = []
    start = 0
    while start < len(words):
        longest = min(max_words, len(words) - start)
        matched = 0
        for length in range(longest, 0, -1):
            phrase = words[start : start + length]
            for position, index in enumerate(indexes):
                if phrase in index:
                    value = index[phrase]
                    if isinstance(value, tuple):
                        found[position].update(value)
                    else:
                        found[position].add(value)
                    matched = length
                    break
            if matched:
                break
        if not matched:
            if not _is_ignored(words[start]):
                leftover.append(words[start])
            matched = 1
        start += matched

    return found, tuple(leftover)


class Vocabulary:
    """Drugs, classes and products of drugs.json, and every entry id.

    Rule parsers register their entries here too, so an id is unique
    across all knowledge files.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.ids: dict[str, str] = {}
        self.names: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.name_owners: dict[tuple[str, ...], str] = {}
        self.rxnorm_codes: dict[str, tuple[str, ...]] = {}
        self.classes: dict[str, DrugClass] = {}
        self.drugs: dict[str, Drug] = {}
        self.products: dict[str, Product] = {}
        for position, raw in enumerate(
            entry_list(data, "drugs.json", "classes")
        ):
            entry = self.new_entry("drugs.json", raw, position)
            entry.allow("id", "name", "source")
            self.classes[entry.id] = DrugClass(
                entry.id, entry.text("name"), entry.source()
            )
        for position, raw in enumerate(
            entry_list(data, "drugs.json", "drugs")
        ):
            self._add_drug(self.new_entry("drugs.json", raw, position))
        for position, raw in enumerate(
            entry_list(data, "drugs.json", "products")
        ):
            self._add_product(self.new_entry("drugs.json", raw, position))

    def new_entry(self, file: str, raw: Any, position: int) -> Entry:
        entry = Entry.with_id(file, raw, position)
        if entry.id in self.ids:
            entry.fail(f"duplicate id, first defined in {self.ids[entry.id]}")
        self.ids[entry.id] = file

        return entry

    def _add_drug(self, entry: Entry) -> None:
        entry.allow(
            "id", "name", "rxnorm", "classes", "brands", "synonyms", "source"
        )
        classes = entry.texts("classes")
        for class_id in classes:
            if class_id not in self.classes:
                entry.fail(f"class {class_id!r} is not defined in drugs.json")
        drug = Drug(
            entry.id,
            entry.text("name"),
            self._rxnorm(entry),
            frozenset(classes),
            entry.source(),
        )
        self.drugs[drug.id] = drug
        self._add_names(
            entry,
            [drug.name, *entry.texts("brands"), *entry.texts("synonyms")],
            (drug.id,),
        )

    def _add_product(self, entry: Entry) -> None:
        entry.allow(
            "id", "name", "rxnorm", "ingredients", "synonyms", "source"
        )
        ingredients = entry.texts("ingredients")
        if not ingredients:
            entry.fail("'ingredients' must name at least one drug")
        for drug_id in ingredients:
            if drug_id not in self.drugs:
                entry.fail(
                    f"ingredient {drug_id!r} is not a drug in drugs.json"
                )
        product = Product(
            entry.id,
            entry.text("name"),
            self._rxnorm(entry, ingredients),
            tuple(ingredients),
            entry.source(),
        )
        self.products[product.id] = product
        self._add_names(
            entry,
            [product.name, *entry.texts("synonyms")],
            product.ingredients,
        )

    def _rxnorm(self, entry: Entry, drugs: Iterable[str] = ()) -> str:
        code = entry.text("rxnorm", required=False)
        if not code:
            return ""
        if not code.isdigit():
            entry.fail(f"rxnorm {code!r} must be a numeric RxNorm concept id")
        if code in self.rxnorm_codes:
            entry.fail(f"rxnorm {code} is already used by another entry")
        self.rxnorm_codes[code] = tuple(drugs) or (entry.id,)

        return code

    def _add_names(
        self, entry: Entry, names: list[str], drugs: tuple[str, ...]
    ) -> None:
        for name in names:
            words = name_words(name)
            if not words:
                entry.fail(f"name {name!r} has no letters or digits")
            owner = self.name_owners.setdefault(words, entry.id)
            if owner != entry.id:
                entry.fail(f"name {name!r} is already used by {owner}")
            self.names[words] = drugs

    def drug_set(self, entry: Entry, key: str) -> frozenset[str]:
        """Expand {"classes": [...], "drugs": [...]} to drug ids."""
        spec = entry.child(key)
        spec.allow("classes", "drugs")
        drugs = set()
        for class_id in spec.texts("classes"):
            if class_id not in self.classes:
                entry.fail(f"{key}: class {class_id!r} is not in drugs.json")
            drugs |= self.class_members(class_id)
        for drug_id in spec.texts("drugs"):
            if drug_id not in self.drugs:
                entry.fail(f"{key}: drug {drug_id!r} is not in drugs.json")
            drugs.add(drug_id)
        if not drugs:
            entry.fail(f"{key!r} must name at least one drug or class")

        return frozenset(drugs)

    def class_members(self, class_id: str) -> frozenset[str]:
        return frozenset(
            drug.id for drug in self.drugs.values() if class_id in drug.classes
        )

    def drug_id(self, entry: Entry, key: str) -> str:
        """Read one drug id and check that drugs.json defines it."""
        drug_id = entry.text(key)
        if drug_id not in self.drugs:
            entry.fail(f"{key}: drug {drug_id!r} is not in drugs.json")

        return drug_id

    def class_id(self, entry: Entry, key: str) -> str:
        """Read one class id and check that drugs.json defines it."""
        class_id = entry.text(key)
        if class_id not in self.classes:
            entry.fail(f"{key}: class {class_id!r} is not in drugs.json")

        return class_id
