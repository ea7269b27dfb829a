"""Load and validate the cited knowledge base that screening applies.

The knowledge lives as JSON in the `knowledge` folder next to this module,
one file per module: `manifest.json` (version), `drugs.json` (vocabulary),
`interactions.json`, `allergy_classes.json` and `renal.json`. Every entry
has a stable `id` and a `source`. Rules name drugs and classes by id, and a
class reference expands to every drug of that class when the files load.
"""

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from arxio.cds.v1 import cds_pb2

KNOWLEDGE_DIR = Path(__file__).parent / "knowledge"

Severity = cds_pb2.Finding.Severity
SEVERITIES = {
    name: Severity.Value(name)
    for name in ("INFO", "MINOR", "MODERATE", "MAJOR", "CONTRAINDICATED")
}

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
class Source:
    """Citation of an entry: a short label, the reference and a link."""

    label: str
    citation: str
    url: str = ""

    def to_proto(self) -> cds_pb2.Source:
        return cds_pb2.Source(
            label=self.label, citation=self.citation, url=self.url
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
class InteractionRule:
    """A drug-drug interaction between any object and any precipitant.

    Both sides are expanded to drug ids. When both sides name the same
    class, the rule pairs any two different members of it.
    """

    id: str
    severity: int
    object_drugs: frozenset[str]
    precipitant_drugs: frozenset[str]
    summary: str
    detail: str
    action: str
    source: Source


@dataclass(frozen=True)
class AllergyRule:
    """A drug-allergy rule whose severity depends on the recorded reaction."""

    id: str
    severity: int
    severe_reaction_severity: int
    members: frozenset[str]
    summary: str
    detail: str
    action: str
    source: Source

    def severity_for(self, allergy_severity: int) -> int:
        """Return the finding severity for an allergy of this severity."""
        if allergy_severity == cds_pb2.Allergy.Severity.SEVERE:
            return self.severe_reaction_severity

        return self.severity


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
class RenalRule:
    """A caution for `drugs` when egfr_at_least <= eGFR < egfr_below."""

    id: str
    drugs: frozenset[str]
    egfr_at_least: float
    egfr_below: float
    severity: int
    summary: str
    detail: str
    action: str
    source: Source

    def applies(self, egfr: float) -> bool:
        return self.egfr_at_least <= egfr < self.egfr_below


@dataclass(frozen=True)
class NameMatch:
    """Drug ids found in a name, and the words that matched nothing."""

    drugs: tuple[str, ...]
    unrecognized: tuple[str, ...]


@dataclass(frozen=True)
class AllergyMatch:
    """Allergy classes and drugs found in an allergy's substance text."""

    allergy_classes: tuple[str, ...]
    drugs: tuple[str, ...]
    unrecognized: tuple[str, ...]


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
    # Name words of every drug name, brand, synonym and product, mapped to
    # the drug ids they stand for.
    names: Mapping[tuple[str, ...], tuple[str, ...]]
    rxnorm_codes: Mapping[str, tuple[str, ...]]
    allergy_terms: Mapping[tuple[str, ...], str]
    max_name_words: int

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
        _, drugs, leftover = self._scan(name_words(name), {})

        return NameMatch(tuple(sorted(drugs)), leftover)

    def resolve_allergy(self, substance: str) -> AllergyMatch:
        """Find allergy classes and drugs in an allergy's substance text.

        A class word ("penicillins", "sulfa") gives its class. A drug gives
        itself and every allergy class it belongs to.
        """
        classes, drugs, leftover = self._scan(
            name_words(substance), self.allergy_terms
        )
        for allergy_class in self.allergy_classes:
            if allergy_class.members & drugs:
                classes.add(allergy_class.id)

        return AllergyMatch(
            tuple(sorted(classes)), tuple(sorted(drugs)), leftover
        )

    def _scan(
        self,
        words: tuple[str, ...],
        terms: Mapping[tuple[str, ...], str],
    ) -> tuple[set[str], set[str], tuple[str, ...]]:
        """Match words against `terms` and drug names, longest first.

        Return the terms' values, the drug ids and the words that matched
        nothing and are not ignored words. A term wins over a drug name of
        the same length.
        """
        found_terms: set[str] = set()
        found_drugs: set[str] = set()
        leftover: list[str] = []
        start = 0
        while start < len(words):
            longest = min(self.max_name_words, len(words) - start)
            for length in range(longest, 0, -1):
                phrase = words[start : start + length]
                if phrase in terms:
                    found_terms.add(terms[phrase])
                    break
                if phrase in self.names:
                    found_drugs.update(self.names[phrase])
                    break
            else:
                if not _is_ignored(words[start]):
                    leftover.append(words[start])
                length = 1
            start += length

        return found_terms, found_drugs, tuple(leftover)


def load_knowledge_base(directory: Path | None = None) -> KnowledgeBase:
    """Load and validate the knowledge base, once per directory.

    Raises ValueError naming the file and entry when an entry lacks its id
    or source, references an unknown drug or class, or is malformed.
    """
    return _load(Path(directory or KNOWLEDGE_DIR).resolve())


@functools.cache
def _load(directory: Path) -> KnowledgeBase:
    manifest = _Entry(
        "manifest.json", "manifest", _read(directory, "manifest")
    )
    manifest.allow("version", "description")
    vocabulary = _Vocabulary(_read(directory, "drugs"))

    interactions = _read(directory, "interactions")
    interaction_rules = tuple(
        vocabulary.interaction(raw, position)
        for position, raw in enumerate(
            _list(interactions, "interactions.json", "interactions")
        )
    )

    allergies = _read(directory, "allergy_classes")
    allergy_classes = tuple(
        vocabulary.allergy_class(raw, position)
        for position, raw in enumerate(
            _list(allergies, "allergy_classes.json", "allergy_classes")
        )
    )
    class_ids = {allergy_class.id for allergy_class in allergy_classes}
    cross_reactivities = tuple(
        vocabulary.cross_reactivity(raw, position, class_ids)
        for position, raw in enumerate(
            _list(allergies, "allergy_classes.json", "cross_reactivities")
        )
    )
    same_drug_allergy = vocabulary.same_drug_allergy(
        allergies.get("same_drug")
    )

    renal = _read(directory, "renal")
    renal_rules = tuple(
        vocabulary.renal_rule(raw, position)
        for position, raw in enumerate(
            _list(renal, "renal.json", "renal_rules")
        )
    )

    return KnowledgeBase(
        version=manifest.text("version"),
        description=manifest.text("description"),
        classes=MappingProxyType(vocabulary.classes),
        drugs=MappingProxyType(vocabulary.drugs),
        products=MappingProxyType(vocabulary.products),
        interactions=interaction_rules,
        allergy_classes=allergy_classes,
        cross_reactivities=cross_reactivities,
        same_drug_allergy=same_drug_allergy,
        renal_rules=renal_rules,
        names=MappingProxyType(vocabulary.names),
        rxnorm_codes=MappingProxyType(vocabulary.rxnorm_codes),
        allergy_terms=MappingProxyType(vocabulary.allergy_terms),
        max_name_words=max(
            map(len, [*vocabulary.names, *vocabulary.allergy_terms]),
            default=1,
        ),
    )


def _read(directory: Path, module: str) -> dict[str, Any]:
    path = directory / f"{module}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path.name}: file not found in {directory}"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name}: invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object at top level")

    return data


def _list(data: dict[str, Any], file: str, key: str) -> list[Any]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{file}: expected a list under {key!r}")

    return entries


class _Entry:
    """One JSON entry, with errors that name its file and id."""

    def __init__(self, file: str, entry_id: str, data: Any) -> None:
        self.file = file
        self.id = entry_id
        if not isinstance(data, dict):
            self.fail("expected a JSON object")
        self.data: dict[str, Any] = data

    @classmethod
    def with_id(cls, file: str, data: Any, position: int) -> "_Entry":
        entry = cls(file, f"entry #{position}", data)
        entry.id = entry.text("id")

        return entry

    def child(self, key: str) -> "_Entry":
        """Return the object under `key`, failing if it is not an object."""
        value = self.data.get(key)
        if not isinstance(value, dict):
            self.fail(f"{key!r} is missing or not a JSON object")

        return _Entry(self.file, self.id, value)

    def fail(self, problem: str) -> NoReturn:
        raise ValueError(f"{self.file}: {self.id}: {problem}")

    def allow(self, *keys: str) -> None:
        unknown = sorted(set(self.data) - set(keys))
        if unknown:
            self.fail(f"unknown field(s) {', '.join(unknown)}")

    def text(self, key: str, required: bool = True) -> str:
        value = self.data.get(key, "")
        if not isinstance(value, str) or (required and not value.strip()):
            self.fail(f"{key!r} must be a non-empty string")

        return value

    def texts(self, key: str) -> tuple[str, ...]:
        values = self.data.get(key, [])
        if not isinstance(values, list) or not all(
            isinstance(value, str) and value.strip() for value in values
        ):
            self.fail(f"{key!r} must be a list of non-empty strings")

        return tuple(values)

    def number(self, key: str, default: float | None = None) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{key!r} must be a number")

        return float(value)

    def severity(self, key: str) -> int:
        name = self.text(key)
        if name not in SEVERITIES:
            self.fail(f"{key!r} must be one of {', '.join(SEVERITIES)}")

        return SEVERITIES[name]

    def source(self) -> Source:
        source = self.child("source")
        source.allow("label", "citation", "url")
        url = source.text("url", required=False)
        if url and not url.startswith("https://"):
            self.fail("source 'url' must start with https://")

        return Source(source.text("label"), source.text("citation"), url)


class _Vocabulary:
    """Parse drugs.json, then the rules that reference its drugs."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.ids: dict[str, str] = {}
        self.names: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.name_owners: dict[tuple[str, ...], str] = {}
        self.rxnorm_codes: dict[str, tuple[str, ...]] = {}
        self.allergy_terms: dict[tuple[str, ...], str] = {}
        self.classes: dict[str, DrugClass] = {}
        self.drugs: dict[str, Drug] = {}
        self.products: dict[str, Product] = {}
        for position, raw in enumerate(_list(data, "drugs.json", "classes")):
            entry = self._new_entry("drugs.json", raw, position)
            entry.allow("id", "name", "source")
            self.classes[entry.id] = DrugClass(
                entry.id, entry.text("name"), entry.source()
            )
        for position, raw in enumerate(_list(data, "drugs.json", "drugs")):
            self._add_drug(self._new_entry("drugs.json", raw, position))
        for position, raw in enumerate(_list(data, "drugs.json", "products")):
            self._add_product(self._new_entry("drugs.json", raw, position))

    def _new_entry(self, file: str, raw: Any, position: int) -> _Entry:
        entry = _Entry.with_id(file, raw, position)
        if entry.id in self.ids:
            entry.fail(f"duplicate id, first defined in {self.ids[entry.id]}")
        self.ids[entry.id] = file

        return entry

    def _add_drug(self, entry: _Entry) -> None:
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

    def _add_product(self, entry: _Entry) -> None:
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

    def _rxnorm(self, entry: _Entry, drugs: Iterable[str] = ()) -> str:
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
        self, entry: _Entry, names: list[str], drugs: tuple[str, ...]
    ) -> None:
        for name in names:
            words = name_words(name)
            if not words:
                entry.fail(f"name {name!r} has no letters or digits")
            owner = self.name_owners.setdefault(words, entry.id)
            if owner != entry.id:
                entry.fail(f"name {name!r} is already used by {owner}")
            self.names[words] = drugs

    def drug_set(self, entry: _Entry, key: str) -> frozenset[str]:
        """Expand {"classes": [...], "drugs": [...]} to drug ids."""
        spec = entry.child(key)
        spec.allow("classes", "drugs")
        drugs = set()
        for class_id in spec.texts("classes"):
            if class_id not in self.classes:
                entry.fail(f"{key}: class {class_id!r} is not in drugs.json")
            drugs |= {
                drug.id
                for drug in self.drugs.values()
                if class_id in drug.classes
            }
        for drug_id in spec.texts("drugs"):
            if drug_id not in self.drugs:
                entry.fail(f"{key}: drug {drug_id!r} is not in drugs.json")
            drugs.add(drug_id)
        if not drugs:
            entry.fail(f"{key!r} must name at least one drug or class")

        return frozenset(drugs)

    def interaction(self, raw: Any, position: int) -> InteractionRule:
        entry = self._new_entry("interactions.json", raw, position)
        entry.allow(
            "id",
            "severity",
            "object",
            "precipitant",
            "summary",
            "detail",
            "action",
            "source",
        )
        return InteractionRule(
            id=entry.id,
            severity=entry.severity("severity"),
            object_drugs=self.drug_set(entry, "object"),
            precipitant_drugs=self.drug_set(entry, "precipitant"),
            summary=entry.text("summary"),
            detail=entry.text("detail"),
            action=entry.text("action"),
            source=entry.source(),
        )

    def _allergy_fields(
        self, entry: _Entry, members: frozenset[str]
    ) -> dict[str, Any]:
        return dict(
            id=entry.id,
            severity=entry.severity("severity"),
            severe_reaction_severity=entry.severity(
                "severe_reaction_severity"
            ),
            members=members,
            summary=entry.text("summary"),
            detail=entry.text("detail"),
            action=entry.text("action"),
            source=entry.source(),
        )

    def allergy_class(self, raw: Any, position: int) -> AllergyClass:
        entry = self._new_entry("allergy_classes.json", raw, position)
        entry.allow(*_ALLERGY_FIELDS, "name", "terms", "members")
        terms = entry.texts("terms")
        if not terms:
            entry.fail("'terms' must list at least one class word")
        for term in terms:
            words = name_words(term)
            owner = self.allergy_terms.setdefault(words, entry.id)
            if owner != entry.id:
                entry.fail(f"term {term!r} is already used by {owner}")

        return AllergyClass(
            **self._allergy_fields(entry, self.drug_set(entry, "members")),
            name=entry.text("name"),
            terms=terms,
        )

    def cross_reactivity(
        self, raw: Any, position: int, allergy_class_ids: set[str]
    ) -> CrossReactivity:
        entry = self._new_entry("allergy_classes.json", raw, position)
        entry.allow(*_ALLERGY_FIELDS, "allergy_class", "members")
        allergy_class = entry.text("allergy_class")
        if allergy_class not in allergy_class_ids:
            entry.fail(f"allergy class {allergy_class!r} is not defined")

        return CrossReactivity(
            **self._allergy_fields(entry, self.drug_set(entry, "members")),
            allergy_class=allergy_class,
        )

    def same_drug_allergy(self, raw: Any) -> AllergyRule:
        if not isinstance(raw, dict):
            raise ValueError(
                "allergy_classes.json: expected an object under 'same_drug'"
            )
        entry = self._new_entry("allergy_classes.json", raw, 0)
        entry.allow(*_ALLERGY_FIELDS)

        return AllergyRule(**self._allergy_fields(entry, frozenset()))

    def renal_rule(self, raw: Any, position: int) -> RenalRule:
        entry = self._new_entry("renal.json", raw, position)
        entry.allow(
            "id",
            "drugs",
            "egfr_at_least",
            "egfr_below",
            "severity",
            "summary",
            "detail",
            "action",
            "source",
        )
        at_least = entry.number("egfr_at_least", default=0)
        below = entry.number("egfr_below")
        if not 0 <= at_least < below:
            entry.fail("expected 0 <= egfr_at_least < egfr_below")

        return RenalRule(
            id=entry.id,
            drugs=self.drug_set(entry, "drugs"),
            egfr_at_least=at_least,
            egfr_below=below,
            severity=entry.severity("severity"),
            summary=entry.text("summary"),
            detail=entry.text("detail"),
            action=entry.text("action"),
            source=entry.source(),
        )


_ALLERGY_FIELDS = (
    "id",
    "severity",
    "severe_reaction_severity",
    "summary",
    "detail",
    "action",
    "source",
)
