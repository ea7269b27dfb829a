"""Dose checks: single, daily and weekly maximums, units, routes and
frequency."""

import json
import math

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds import dosing
from services.cds.knowledge_base import load_knowledge_base
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

ACETAMINOPHEN = "dose.acetaminophen"
IBUPROFEN = "dose.ibuprofen-oral"
IBUPROFEN_IV = "dose.ibuprofen-intravenous"
IBUPROFEN_CHILD = "dose.ibuprofen-oral-children"
POTASSIUM = "dose.potassium-chloride"


def ordered(
    name: str, value: float, unit: str, frequency: str = "", route: str = ""
) -> cds_pb2.Medication:
    return cds_pb2.Medication(
        name=name,
        dose=cds_pb2.Dose(value=value, unit=unit),
        frequency=frequency,
        route=route,
    )


def gaps_for(result, subject: str) -> list[str]:
    return [g.reason for g in result.not_screened if g.subject == subject]


def dose_findings(order: cds_pb2.Medication) -> list[cds_pb2.Finding]:
    result = screen(request_of(order, **COMPLETE), KB)

    return [f for f in result.findings if f.category == Finding.DOSE]


def _limit_order(limit, doses_per_day: int, dose: float):
    unit = limit.max_daily.unit
    route = limit.routes[0] if limit.routes else ""

    return ordered(
        drug_name(limit.drug),
        dose,
        unit,
        f"{doses_per_day} times daily",
        route,
    )


def _patient_for(limit) -> dict:
    """A patient inside the limit's ages whose weight does not lower it."""
    if limit.below_age is None:
        return COMPLETE
    patient = {**COMPLETE, "age_years": limit.below_age - 1}
    if limit.max_daily_per_kg is not None:
        per_kg = dosing.in_unit(
            limit.max_daily_per_kg.value,
            limit.max_daily_per_kg.unit,
            limit.max_daily.unit,
        )
        patient["weight_kg"] = limit.max_daily.value / per_kg

    return patient


def _largest_single(limit) -> float:
    """The largest dose that passes the single-dose limit."""
    unit = limit.max_daily.unit
    largest = limit.max_daily.value
    if limit.max_single is not None:
        single = dosing.in_unit(
            limit.max_single.value, limit.max_single.unit, unit
        )
        largest = min(largest, single)

    return largest


DAILY_LIMITS = [
    limit
    for limit in KB.dose_limits
    if limit.max_weekly is None and limit.max_doses_per_week is None
]
WEEKLY_LIMITS = [
    limit for limit in KB.dose_limits if limit not in DAILY_LIMITS
]


class TestEveryLimit:
    @pytest.mark.parametrize("limit", rule_params(DAILY_LIMITS))
    def test_at_the_limit_no_finding(self, limit):
        """The most doses a day that stay at the maximum pass."""
        dose = _largest_single(limit)
        per_day = max(1, math.floor(limit.max_daily.value / dose))
        result = screen(
            request_of(
                _limit_order(limit, per_day, dose), **_patient_for(limit)
            ),
            KB,
        )

        assert [] == by_rule(result, limit.id)
        assert [] == gaps_for(result, drug_name(limit.drug))

    @pytest.mark.parametrize("limit", rule_params(DAILY_LIMITS))
    def test_one_more_dose_a_day_fires(self, limit):
        """One dose a day beyond the maximum gives a dose finding."""
        dose = _largest_single(limit)
        per_day = math.floor(limit.max_daily.value / dose) + 1
        result = screen(
            request_of(
                _limit_order(limit, per_day, dose), **_patient_for(limit)
            ),
            KB,
        )

        [finding] = by_rule(result, limit.id)
        assert Finding.DOSE == finding.category
        assert [drug_name(limit.drug)] == list(finding.subjects)
        assert "a day" in finding.detail

    @pytest.mark.parametrize(
        "limit",
        rule_params(limit for limit in KB.dose_limits if limit.max_single),
    )
    def test_single_dose_over_its_maximum_fires(self, limit):
        """A single dose above its own maximum fires at once a day."""
        single = dosing.in_unit(
            limit.max_single.value,
            limit.max_single.unit,
            limit.max_daily.unit,
        )
        result = screen(
            request_of(
                _limit_order(limit, 1, single * 1.5), **_patient_for(limit)
            ),
            KB,
        )

        [finding] = by_rule(result, limit.id)
        assert "single dose" in finding.detail


def _weekly_order(limit, doses_per_week: int, dose: float):
    """Order `dose` spread evenly over the week, as an hourly interval."""
    route = limit.routes[0] if limit.routes else ""

    return ordered(
        drug_name(limit.drug),
        dose,
        limit.max_daily.unit,
        f"every {168 / doses_per_week:g} hours",
        route,
    )


def _weekly_plan(limit) -> tuple[float, int]:
    """The largest dose and the most doses a week that pass the limit."""
    dose = _largest_single(limit)
    doses_per_week = limit.max_doses_per_week or 7
    if limit.max_weekly is not None:
        weekly = dosing.in_unit(
            limit.max_weekly.value, limit.max_weekly.unit, limit.max_daily.unit
        )
        dose = min(dose, weekly)
        doses_per_week = min(doses_per_week, math.floor(weekly / dose))

    return dose, max(1, doses_per_week)


class TestWeeklyLimits:
    @pytest.mark.parametrize("limit", rule_params(WEEKLY_LIMITS))
    def test_at_the_weekly_limit_no_finding(self, limit):
        """The most doses a week that stay within the limit pass."""
        dose, doses_per_week = _weekly_plan(limit)
        order = _weekly_order(limit, doses_per_week, dose)
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, limit.id)
        assert [] == gaps_for(result, drug_name(limit.drug))

    @pytest.mark.parametrize("limit", rule_params(WEEKLY_LIMITS))
    def test_one_more_dose_a_week_fires(self, limit):
        """One dose a week beyond the limit gives a dose finding."""
        dose, doses_per_week = _weekly_plan(limit)
        order = _weekly_order(limit, doses_per_week + 1, dose)
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, limit.id)
        assert Finding.DOSE == finding.category
        assert "a week" in finding.detail

    def test_methotrexate_daily_fires(self):
        """Oral methotrexate 10 mg daily is seven doses a week."""
        order = ordered("methotrexate", 10, "mg", "daily", "PO")

        [finding] = dose_findings(order)
        assert "dose.methotrexate-oral" == finding.rule_id
        assert Finding.MAJOR == finding.severity
        assert "7 doses a week" in finding.detail

    @pytest.mark.parametrize(
        ("dose", "frequency"),
        [(15, "once weekly"), (75, "every week"), (2.5, "every other day")],
    )
    def test_methotrexate_weekly_schedules_pass(self, dose, frequency):
        """Labeled weekly schedules give no dose finding."""
        order = ordered("methotrexate", dose, "mg", frequency, "oral")

        assert [] == dose_findings(order)

    def test_methotrexate_weekly_amount_fires(self):
        """Two 50 mg doses a week are above 75 mg a week."""
        order = ordered("methotrexate", 50, "mg", "every 84 hours", "oral")

        [finding] = dose_findings(order)
        assert "100 mg a week" in finding.detail
        assert "75 mg" in finding.detail

    def test_doses_per_week_below_one_rejected(self, knowledge_copy):
        """max_doses_per_week must be a whole number of at least 1."""
        path = knowledge_copy / "doses.json"
        data = json.loads(path.read_text())
        limit = next(
            entry
            for entry in data["dose_limits"]
            if entry["id"] == "dose.methotrexate-oral"
        )
        limit["max_doses_per_week"] = 0
        path.write_text(json.dumps(data))

        with pytest.raises(ValueError, match="max_doses_per_week"):
            load_knowledge_base(knowledge_copy)


class TestDailyTotal:
    def test_every_four_hours_exceeds(self):
        """1,000 mg every 4 hours is 6,000 mg a day."""
        order = ordered("acetaminophen", 1000, "mg", "q4h")
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, ACETAMINOPHEN)
        assert "6,000 mg a day" in finding.detail
        assert "4,000 mg" in finding.detail
        assert Finding.MAJOR == finding.severity
        assert finding.source.citation

    def test_every_six_hours_is_the_maximum(self):
        order = ordered("acetaminophen", 1000, "mg", "every 6 hours")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)

    def test_range_counts_the_shortest_interval(self):
        """ "Every 4 to 6 hours" allows six doses a day."""
        order = ordered("acetaminophen", 1000, "mg", "every 4 to 6 hours")
        result = screen(request_of(order, **COMPLETE), KB)

        assert 1 == len(by_rule(result, ACETAMINOPHEN))

    def test_as_needed_counts_every_allowed_dose(self):
        order = ordered("acetaminophen", 1000, "mg", "q4h PRN pain")
        result = screen(request_of(order, **COMPLETE), KB)

        assert 1 == len(by_rule(result, ACETAMINOPHEN))

    def test_grams_are_converted(self):
        """1 g every 4 hours is over; 0.5 g every 4 hours is not."""
        over = ordered("acetaminophen", 1, "g", "q4h")
        under = ordered("acetaminophen", 0.5, "g", "q4h")

        assert 1 == len(
            by_rule(screen(request_of(over, **COMPLETE), KB), ACETAMINOPHEN)
        )
        assert [] == by_rule(
            screen(request_of(under, **COMPLETE), KB), ACETAMINOPHEN
        )

    def test_brand_name_is_checked(self):
        order = ordered("Tylenol", 1000, "mg", "q4h")
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, ACETAMINOPHEN)
        assert ["Tylenol"] == list(finding.subjects)

    def test_single_dose_over_maximum_names_it(self):
        order = ordered("ibuprofen", 1200, "mg", "twice daily", "PO")
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, IBUPROFEN)
        assert "single dose of 1,200 mg" in finding.detail
        assert "800 mg" in finding.detail


class TestWeightAndAge:
    def test_weight_lowers_the_daily_maximum(self):
        """At 40 kg, 75 mg/kg is 3,000 mg, below the 4,000 mg maximum."""
        order = ordered("acetaminophen", 1000, "mg", "every 6 hours")
        patient = {**COMPLETE, "weight_kg": 40}
        result = screen(request_of(order, **patient), KB)

        [finding] = by_rule(result, ACETAMINOPHEN)
        assert "/kg of body weight" in finding.detail

    def test_heavy_patient_keeps_the_fixed_maximum(self):
        order = ordered("acetaminophen", 1000, "mg", "every 6 hours")
        patient = {**COMPLETE, "weight_kg": 120}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)

    def test_child_with_weight_uses_weight(self):
        """A 10-year-old of 30 kg may have 2,250 mg a day."""
        order = ordered("acetaminophen", 650, "mg", "q4h")
        patient = {**COMPLETE, "age_years": 10, "weight_kg": 30}
        result = screen(request_of(order, **patient), KB)

        assert 1 == len(by_rule(result, ACETAMINOPHEN))
        assert [] == gaps_for(result, "acetaminophen")

    def test_child_without_weight_is_not_screened(self):
        order = ordered("acetaminophen", 325, "mg", "q6h")
        patient = {**COMPLETE, "age_years": 10}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)
        [reason] = gaps_for(result, "acetaminophen")
        assert "under 12 years" in reason

    def test_child_without_weight_limit_is_not_screened(self):
        """Naproxen has no limit for children, so a child is a gap."""
        order = ordered("naproxen", 100, "mg", "q8h", "oral")
        patient = {**COMPLETE, "age_years": 6, "weight_kg": 20}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, "dose.naproxen")
        [reason] = gaps_for(result, "naproxen")
        assert "under 18 years" in reason


class TestPediatricLimits:
    def test_child_above_per_kg_maximum(self):
        """400 mg every 6 hours at 16 kg is 100 mg/kg a day."""
        order = ordered("ibuprofen", 400, "mg", "every 6 hours", "oral")
        patient = {**COMPLETE, "age_years": 4, "weight_kg": 16}
        result = screen(request_of(order, **patient), KB)

        [finding] = by_rule(result, IBUPROFEN_CHILD)
        assert "1,600 mg a day" in finding.detail
        assert "40 mg/kg" in finding.detail
        assert [] == by_rule(result, IBUPROFEN)
        assert [] == gaps_for(result, "ibuprofen")

    def test_child_within_per_kg_maximum(self):
        """10 mg/kg every 6 hours is the labeled 40 mg/kg a day."""
        order = ordered("ibuprofen", 160, "mg", "every 6 hours", "oral")
        patient = {**COMPLETE, "age_years": 4, "weight_kg": 16}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, IBUPROFEN_CHILD)
        assert [] == gaps_for(result, "ibuprofen")

    def test_child_without_weight_is_a_gap(self):
        """The pediatric limit is per kg, so it needs the weight."""
        order = ordered("ibuprofen", 100, "mg", "q8h", "oral")
        patient = {**COMPLETE, "age_years": 6}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, IBUPROFEN_CHILD)
        [reason] = gaps_for(result, "ibuprofen")
        assert "weight not given" in reason

    def test_adult_keeps_the_adult_limit(self):
        """At 40 years the pediatric limit does not apply."""
        order = ordered("ibuprofen", 800, "mg", "q6h", "oral")
        patient = {**COMPLETE, "weight_kg": 16}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, IBUPROFEN_CHILD)
        assert [] == by_rule(result, IBUPROFEN)

    def test_unknown_age_uses_the_adult_limit(self):
        """Without an age, only limits without an upper age apply."""
        order = ordered("ibuprofen", 800, "mg", "q4h", "oral")
        patient = {"sex": COMPLETE["sex"], "egfr": 90, "weight_kg": 16}
        result = screen(request_of(order, **patient), KB)

        assert 1 == len(by_rule(result, IBUPROFEN))
        assert [] == by_rule(result, IBUPROFEN_CHILD)

    def test_below_age_not_above_min_age_rejected(self, knowledge_copy):
        """A pediatric limit needs min_age below below_age."""
        path = knowledge_copy / "doses.json"
        data = json.loads(path.read_text())
        limit = next(
            entry
            for entry in data["dose_limits"]
            if entry["id"] == IBUPROFEN_CHILD
        )
        limit["below_age"] = limit["min_age"]
        path.write_text(json.dumps(data))

        with pytest.raises(ValueError, match="min_age < below_age"):
            load_knowledge_base(knowledge_copy)


class TestRoutes:
    @pytest.mark.parametrize("route", ["PO", "p.o.", "oral", "by mouth"])
    def test_route_spellings(self, route):
        order = ordered("ibuprofen", 800, "mg", "q4h", route)
        result = screen(request_of(order, **COMPLETE), KB)

        assert 1 == len(by_rule(result, IBUPROFEN))

    def test_route_without_a_limit_is_not_screened(self):
        """Ibuprofen has oral and IV limits, so a rectal order is a gap."""
        order = ordered("ibuprofen", 800, "mg", "q4h", "PR")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, IBUPROFEN)
        assert [] == by_rule(result, IBUPROFEN_IV)
        [reason] = gaps_for(result, "ibuprofen")
        assert '"PR"' in reason

    def test_route_picks_its_own_limit(self):
        """An IV order is checked against the IV limit only."""
        order = ordered("ibuprofen", 800, "mg", "q4h", "IV")
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, IBUPROFEN_IV)
        assert "4,800 mg a day" in finding.detail
        assert [] == by_rule(result, IBUPROFEN)

    def test_single_dose_limit_differs_by_route(self):
        """Ketorolac 60 mg is a labeled IM dose but above the IV one."""
        intramuscular = ordered("ketorolac", 60, "mg", "once", "IM")
        intravenous = ordered("ketorolac", 60, "mg", "once", "IV")

        assert [] == dose_findings(intramuscular)
        [finding] = dose_findings(intravenous)
        assert "dose.ketorolac-intravenous" == finding.rule_id
        assert "single dose of 60 mg" in finding.detail

    def test_no_route_uses_most_permissive_limit(self):
        """Without a route, ketorolac is held to its highest maximum."""
        within = ordered("ketorolac", 30, "mg", "q6h")
        above = ordered("ketorolac", 40, "mg", "q6h")

        assert [] == dose_findings(within)
        [finding] = dose_findings(above)
        assert "dose.ketorolac-nasal" == finding.rule_id

    @pytest.mark.parametrize(
        ("name", "dose"), [("ketorolac", 60), ("ondansetron", 24)]
    )
    def test_no_route_passes_if_any_route_allows(self, name, dose):
        """A single dose labeled for one route passes without a route."""
        order = ordered(name, dose, "mg", "once")

        assert [] == dose_findings(order)
        assert [] == gaps_for(screen(request_of(order, **COMPLETE), KB), name)

    def test_unknown_route_is_not_screened(self):
        order = ordered("ibuprofen", 800, "mg", "q4h", "via carrier pigeon")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, IBUPROFEN)
        [reason] = gaps_for(result, "ibuprofen")
        assert "via carrier pigeon" in reason


class TestNotScreened:
    def test_unknown_unit(self):
        """A unit the engine does not know is a gap, never an error."""
        order = ordered("acetaminophen", 2, "tabs", "q4h")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)
        [reason] = gaps_for(result, "acetaminophen")
        assert '"tabs"' in reason

    def test_unit_of_another_dimension(self):
        order = ordered("acetaminophen", 500, "units", "q4h")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)
        [reason] = gaps_for(result, "acetaminophen")
        assert "cannot be compared" in reason

    def test_unknown_frequency(self):
        order = ordered("acetaminophen", 500, "mg", "whenever")
        result = screen(request_of(order, **COMPLETE), KB)

        [reason] = gaps_for(result, "acetaminophen")
        assert '"whenever"' in reason

    def test_missing_frequency(self):
        order = ordered("acetaminophen", 500, "mg")
        result = screen(request_of(order, **COMPLETE), KB)

        [reason] = gaps_for(result, "acetaminophen")
        assert "not given" in reason

    def test_missing_frequency_single_dose_over_daily_maximum(self):
        """One dose above the daily maximum fires whatever the frequency."""
        order = ordered("acetaminophen", 5, "g")
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, ACETAMINOPHEN)
        assert "maximum daily dose" in finding.detail

    def test_combination_product(self):
        """A product's single dose cannot be split between ingredients."""
        order = ordered("Percocet", 10, "mg", "q4h")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)
        [reason] = gaps_for(result, "Percocet")
        assert "combination product" in reason

    def test_no_dose_no_gap(self):
        """An order without a dose has nothing to check."""
        result = screen(request_of("acetaminophen", **COMPLETE), KB)

        assert [] == by_rule(result, ACETAMINOPHEN)
        assert [] == gaps_for(result, "acetaminophen")

    def test_drug_without_a_limit_no_gap(self):
        """Warfarin is dosed by INR and has no maximum to check."""
        order = ordered("warfarin", 5, "mg", "daily")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == [f for f in result.findings if f.category == Finding.DOSE]
        assert [] == gaps_for(result, "warfarin")


class TestOtherUnits:
    def test_meq_limit_without_route(self):
        """A limit in mEq is checked when the order gives no route."""
        over = ordered("potassium chloride", 40, "mEq", "q4h")
        within = ordered("potassium chloride", 20, "mEq", "bid")

        [finding] = by_rule(
            screen(request_of(over, **COMPLETE), KB), POTASSIUM
        )
        assert "240 mEq a day" in finding.detail
        assert [] == by_rule(
            screen(request_of(within, **COMPLETE), KB), POTASSIUM
        )

    def test_meq_dose_against_mass_is_a_gap(self):
        """Potassium ordered in mg cannot be compared with mEq."""
        order = ordered("KCl", 1500, "mg", "daily", "PO")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, POTASSIUM)
        [reason] = gaps_for(result, "KCl")
        assert "cannot be compared" in reason

    def test_milligrams_against_micrograms(self):
        """Misoprostol 0.4 mg four times daily is 1,600 mcg a day."""
        order = ordered("misoprostol", 0.4, "mg", "qid", "oral")
        result = screen(request_of(order, **COMPLETE), KB)

        [finding] = by_rule(result, "dose.misoprostol")
        assert "1,600 mcg a day" in finding.detail
        assert "single dose of 400 mcg" in finding.detail

    def test_grams_limit(self):
        """Ceftriaxone 2 g every 8 hours is above 4 g a day."""
        over = ordered("ceftriaxone", 2, "g", "q8h", "IV")
        within = ordered("ceftriaxone", 2000, "mg", "q12h", "IV")

        [finding] = by_rule(
            screen(request_of(over, **COMPLETE), KB), "dose.ceftriaxone"
        )
        assert "6 g a day" in finding.detail
        assert [] == by_rule(
            screen(request_of(within, **COMPLETE), KB), "dose.ceftriaxone"
        )

    def test_mixed_dimensions_for_one_drug_rejected(self, knowledge_copy):
        """One drug's limits must all convert to one unit."""
        path = knowledge_copy / "doses.json"
        data = json.loads(path.read_text())
        limit = next(
            entry
            for entry in data["dose_limits"]
            if entry["id"] == "dose.potassium-chloride"
        )
        data["dose_limits"].append(
            {
                **limit,
                "id": "dose.potassium-chloride-intravenous",
                "routes": ["intravenous"],
                "max_daily": {"value": 15000, "unit": "mg"},
                "max_single": {"value": 3000, "unit": "mg"},
            }
        )
        path.write_text(json.dumps(data))

        with pytest.raises(ValueError, match="for the same drug"):
            load_knowledge_base(knowledge_copy)
