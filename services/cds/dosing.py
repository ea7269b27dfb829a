"""Read a medication's dose unit, route and frequency as the dose check
needs them.

Each reader returns None for text it does not recognize, and the dose check
then reports the medication as not screened for dose instead of guessing.
"""

import re
from dataclasses import dataclass

from services.cds.vocabulary import name_words

# Amounts convert within a dimension: mass to milligrams; international
# units and the other counting units only to themselves.
UNIT_SCALES: dict[str, tuple[str, float]] = {
    "g": ("mass", 1000.0),
    "mg": ("mass", 1.0),
    "mcg": ("mass", 0.001),
    "ng": ("mass", 0.000001),
    "unit": ("unit", 1.0),
    "meq": ("meq", 1.0),
    "mmol": ("mmol", 1.0),
}
UNIT_SYNONYMS = {
    "g": "g",
    "gm": "g",
    "gram": "g",
    "grams": "g",
    "mg": "mg",
    "milligram": "mg",
    "milligrams": "mg",
    "mcg": "mcg",
    "ug": "mcg",
    "\u00b5g": "mcg",
    "\u03bcg": "mcg",
    "microgram": "mcg",
    "micrograms": "mcg",
    "ng": "ng",
    "nanogram": "ng",
    "nanograms": "ng",
    "unit": "unit",
    "units": "unit",
    "u": "unit",
    "iu": "unit",
    "international unit": "unit",
    "international units": "unit",
    "meq": "meq",
    "mmol": "mmol",
}

# Canonical route names and the words that mean them.
ROUTE_SYNONYMS = {
    "oral": "oral",
    "po": "oral",
    "by mouth": "oral",
    "enteral": "oral",
    "intravenous": "intravenous",
    "iv": "intravenous",
    "iv push": "intravenous",
    "iv piggyback": "intravenous",
    "ivpb": "intravenous",
    "intramuscular": "intramuscular",
    "im": "intramuscular",
    "subcutaneous": "subcutaneous",
    "subcut": "subcutaneous",
    "sc": "subcutaneous",
    "sq": "subcutaneous",
    "subq": "subcutaneous",
    "sublingual": "sublingual",
    "sl": "sublingual",
    "buccal": "sublingual",
    "rectal": "rectal",
    "pr": "rectal",
    "per rectum": "rectal",
    "topical": "topical",
    "transdermal": "transdermal",
    "inhalation": "inhalation",
    "inhaled": "inhalation",
    "nasal": "nasal",
    "intranasal": "nasal",
    "ophthalmic": "ophthalmic",
}
ROUTES = frozenset(ROUTE_SYNONYMS.values())

# Doses a day of fixed frequency terms, including the Latin abbreviations
# of prescriptions (qd, bid, tid, qid, qhs, qod).
_DOSES_PER_DAY = {
    "daily": 1,
    "once daily": 1,
    "once a day": 1,
    "once per day": 1,
    "one time daily": 1,
    "every day": 1,
    "each day": 1,
    "per day": 1,
    "a day": 1,
    "qd": 1,
    "od": 1,
    "qday": 1,
    "qam": 1,
    "qpm": 1,
    "qhs": 1,
    "hs": 1,
    "at bedtime": 1,
    "nightly": 1,
    "every night": 1,
    "every morning": 1,
    "every evening": 1,
    "in the morning": 1,
    "in the evening": 1,
    "bid": 2,
    "twice daily": 2,
    "twice a day": 2,
    "twice per day": 2,
    "tid": 3,
    "thrice daily": 3,
    "qid": 4,
    "weekly": 1 / 7,
    "once weekly": 1 / 7,
    "once a week": 1 / 7,
    "every week": 1 / 7,
    "qweek": 1 / 7,
    "qwk": 1 / 7,
    "every other day": 1 / 2,
    "qod": 1 / 2,
    "monthly": 1 / 30,
    "once a month": 1 / 30,
    "every month": 1 / 30,
    # A single dose: the day's amount is that dose.
    "once": 1,
    "one time": 1,
    "stat": 1,
    "now": 1,
    "x1": 1,
}
_NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
}
# "every 4 to 6 hours", "q4-6h", "q 8 h", "every 12 hrs"
_INTERVAL = re.compile(
    r"^(?:every|q)\s*(\d+(?:\.\d+)?)(?:\s*(?:-|to)\s*(\d+(?:\.\d+)?))?"
    r"\s*(h|hr|hrs|hour|hours|d|day|days|w|wk|week|weeks)$"
)
# "3 times daily", "two times a day", "4x daily", "3x/day"
_TIMES = re.compile(
    r"^(\d+|one|two|three|four|five|six)\s*(?:x|times)\s*"
    r"(?:daily|a day|per day|/day|/d|day)$"
)
# "As needed" and the indication that follows it ("prn pain", "as needed
# for sleep") say why, not how often.
_AS_NEEDED = re.compile(r"\b(?:as needed|as required|if needed|prn)\b.*$")
# Words that qualify a frequency without changing it: meal timing, and an
# indication or a duration ("for pain", "for 5 days") to the end.
_QUALIFIERS = re.compile(
    r"\b(?:with meals|with food|after meals|before meals)\b|\bfor\b.*$"
)
_HOURS_PER_UNIT = {"h": 1, "d": 24, "w": 168}


def canonical_unit(text: str) -> str | None:
    """Return the canonical unit of a dose's unit text, or None."""
    key = " ".join(text.casefold().replace(".", "").split())

    return UNIT_SYNONYMS.get(key)


def in_unit(value: float, unit: str, target: str) -> float | None:
    """Convert an amount between units of one dimension, or return None."""
    dimension, scale = UNIT_SCALES[unit]
    target_dimension, target_scale = UNIT_SCALES[target]
    if dimension != target_dimension:
        return None

    return value * scale / target_scale


def canonical_route(text: str) -> str | None:
    """Return the canonical route of a route text, or None."""
    # Dots are dropped first, so "p.o." and "I.V." read as "po" and "iv".
    key = " ".join(name_words(text.replace(".", "")))

    return ROUTE_SYNONYMS.get(key)


@dataclass(frozen=True)
class Frequency:
    """The most doses a frequency allows per day, and whether it is PRN."""

    doses_per_day: float
    as_needed: bool


def parse_frequency(text: str) -> Frequency | None:
    """Read the maximum doses a day from a frequency text, or return None.

    A range such as "every 4 to 6 hours" gives its shortest interval, so
    the daily total is the most the order allows. "PRN" alone says nothing
    of how often, so it gives None.
    """
    folded = " ".join(text.casefold().replace(",", " ").split())
    as_needed = _AS_NEEDED.search(folded) is not None
    folded = _QUALIFIERS.sub(" ", _AS_NEEDED.sub(" ", folded))
    folded = " ".join(folded.split())
    if not folded:
        return None
    if folded in _DOSES_PER_DAY:
        return Frequency(_DOSES_PER_DAY[folded], as_needed)
    times = _TIMES.match(folded)
    if times is not None:
        count = times.group(1)
        per_day = _NUMBER_WORDS.get(count) or int(count)

        return Frequency(per_day, as_needed) if per_day > 0 else None
    interval = _INTERVAL.match(folded)
    if interval is not None:
        bounds = [float(interval.group(1))]
        if interval.group(2):
            bounds.append(float(interval.group(2)))
        shortest = min(bounds)
        unit = interval.group(3)[0]
        hours = shortest * _HOURS_PER_UNIT[unit]
        if hours <= 0:
            return None

        return Frequency(24 / hours, as_needed)

    return None
