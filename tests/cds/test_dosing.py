"""Reading dose units, routes and frequencies for the dose check."""

import pytest

from services.cds.dosing import (
    canonical_route,
    canonical_unit,
    in_unit,
    parse_frequency,
)


class TestUnits:
    @pytest.mark.parametrize(
        ("text", "unit"),
        [
            ("mg", "mg"),
            ("MG", "mg"),
            ("mg.", "mg"),
            ("milligrams", "mg"),
            ("g", "g"),
            ("gram", "g"),
            ("mcg", "mcg"),
            ("\u00b5g", "mcg"),
            ("ug", "mcg"),
            ("units", "unit"),
            ("IU", "unit"),
            ("mEq", "meq"),
            ("mmol", "mmol"),
        ],
    )
    def test_known_units(self, text, unit):
        """Unit spellings map to one canonical unit."""
        assert unit == canonical_unit(text)

    @pytest.mark.parametrize("text", ["tablet", "mL", "puffs", "", "mg/kg"])
    def test_unknown_units(self, text):
        """Counts, volumes and rates are not amounts the check can read."""
        assert None is canonical_unit(text)

    def test_mass_converts(self):
        """Grams and micrograms convert to milligrams."""
        assert 1500 == in_unit(1.5, "g", "mg")
        assert 0.25 == in_unit(250, "mcg", "mg")

    def test_dimensions_do_not_convert(self):
        """Units and milligrams cannot be compared."""
        assert None is in_unit(5000, "unit", "mg")


class TestRoutes:
    @pytest.mark.parametrize(
        ("text", "route"),
        [
            ("oral", "oral"),
            ("PO", "oral"),
            ("by mouth", "oral"),
            ("IV", "intravenous"),
            ("i.v.", "intravenous"),
            ("p.o.", "oral"),
            ("Intravenous", "intravenous"),
            ("subq", "subcutaneous"),
            ("SL", "sublingual"),
            ("per rectum", "rectal"),
            ("intrathecal", None),
        ],
    )
    def test_route_names(self, text, route):
        """Route abbreviations map to canonical routes; others do not."""
        assert route == canonical_route(text)


class TestFrequencies:
    @pytest.mark.parametrize(
        ("text", "per_day"),
        [
            ("daily", 1),
            ("once daily", 1),
            ("QD", 1),
            ("at bedtime", 1),
            ("bid", 2),
            ("twice a day", 2),
            ("TID", 3),
            ("qid", 4),
            ("every 8 hours", 3),
            ("q6h", 4),
            ("q 4 h", 6),
            ("every 4 to 6 hours", 6),
            ("q4-6h", 6),
            ("every 12 hrs", 2),
            ("3 times daily", 3),
            ("two times a day", 2),
            ("4x daily", 4),
            ("weekly", 1 / 7),
            ("every other day", 0.5),
            ("every 2 days", 0.5),
            ("once", 1),
            ("q6h prn", 4),
            ("every 6 hours as needed for pain", 4),
            ("q4h PRN pain", 6),
            ("BID with meals", 2),
            ("tid for 5 days", 3),
        ],
    )
    def test_doses_per_day(self, text, per_day):
        """Each frequency gives the most doses a day it allows."""
        frequency = parse_frequency(text)

        assert frequency is not None
        assert per_day == pytest.approx(frequency.doses_per_day)

    def test_prn_flag(self):
        """As-needed qualifiers are kept as a flag."""
        assert parse_frequency("q6h prn").as_needed
        assert not parse_frequency("q6h").as_needed
        assert not parse_frequency("bid with meals").as_needed

    @pytest.mark.parametrize(
        "text",
        [
            "prn",
            "",
            "with meals",
            "continuous",
            "q0h",
            "sometimes",
            "as needed for sleep",
        ],
    )
    def test_unreadable_frequencies(self, text):
        """Frequencies that say nothing of how often give None."""
        assert None is parse_frequency(text)
