"""Dose checks: single and daily maximums, units, routes and frequency."""

import math

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds import dosing
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


class TestEveryLimit:
    @pytest.mark.parametrize("limit", rule_params(KB.dose_limits))
    def test_at_the_limit_no_finding(self, limit):
        """The most doses a day that stay at the maximum pass."""
        dose = _largest_single(limit)
        per_day = max(1, math.floor(limit.max_daily.value / dose))
        result = screen(
            request_of(_limit_order(limit, per_day, dose), **COMPLETE), KB
        )

        assert [] == by_rule(result, limit.id)
        assert [] == gaps_for(result, drug_name(limit.drug))

    @pytest.mark.parametrize("limit", rule_params(KB.dose_limits))
    def test_one_more_dose_a_day_fires(self, limit):
        """One dose a day beyond the maximum gives a dose finding."""
        dose = _largest_single(limit)
        per_day = math.floor(limit.max_daily.value / dose) + 1
        result = screen(
            request_of(_limit_order(limit, per_day, dose), **COMPLETE), KB
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
            request_of(_limit_order(limit, 1, single * 1.5), **COMPLETE), KB
        )

        [finding] = by_rule(result, limit.id)
        assert "single dose" in finding.detail


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
        """Ibuprofen's limit has no weight basis, so a child is a gap."""
        order = ordered("ibuprofen", 100, "mg", "q8h", "oral")
        patient = {**COMPLETE, "age_years": 6, "weight_kg": 20}
        result = screen(request_of(order, **patient), KB)

        assert [] == by_rule(result, IBUPROFEN)
        [reason] = gaps_for(result, "ibuprofen")
        assert "under 18 years" in reason


class TestRoutes:
    @pytest.mark.parametrize("route", ["PO", "p.o.", "oral", "by mouth"])
    def test_route_spellings(self, route):
        order = ordered("ibuprofen", 800, "mg", "q4h", route)
        result = screen(request_of(order, **COMPLETE), KB)

        assert 1 == len(by_rule(result, IBUPROFEN))

    def test_route_without_a_limit_is_not_screened(self):
        """Ibuprofen's limit is oral; an IV order is reported, not passed."""
        order = ordered("ibuprofen", 800, "mg", "q4h", "IV")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == by_rule(result, IBUPROFEN)
        [reason] = gaps_for(result, "ibuprofen")
        assert '"IV"' in reason

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
        order = ordered("metformin", 500, "mg", "bid")
        result = screen(request_of(order, **COMPLETE), KB)

        assert [] == [f for f in result.findings if f.category == Finding.DOSE]
        assert [] == gaps_for(result, "metformin")
