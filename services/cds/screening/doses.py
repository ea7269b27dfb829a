"""Dose checks: a single dose, a daily total or a weekly schedule above
the labeled maximum.

The daily total is the dose times the most doses a day that the frequency
allows. A dose whose unit, route or frequency cannot be read is reported as
not screened for dose, never guessed.
"""

from collections.abc import Iterator

from arxio.cds.v1 import cds_pb2

from services.cds import dosing
from services.cds.knowledge_base import KnowledgeBase
from services.cds.rules import Amount, DoseLimit
from services.cds.screening.findings import FindingRecord, make_finding
from services.cds.screening.inputs import (
    ScreenedMedication,
    ScreenedMedications,
    not_screened,
)

DOSE = cds_pb2.Finding.Category.DOSE


# Display spellings in finding texts for the canonical units that differ
# from their usual spelling.
_UNIT_LABELS = {"meq": "mEq", "unit": "units"}


def _amount_text(value: float, unit: str) -> str:
    label = _UNIT_LABELS.get(unit, unit)
    if value == int(value):
        return f"{int(value):,} {label}"

    return f"{value:,.3g} {label}"


def _in(amount: Amount, unit: str) -> float:
    converted = dosing.in_unit(amount.value, amount.unit, unit)
    # The knowledge base rejects limits whose amounts do not convert.
    assert converted is not None

    return converted


def _limits_for_route(
    limits: list[DoseLimit], route: str | None
) -> list[DoseLimit]:
    """Return the limits for a route, or every limit without one.

    Without a route the limits come most permissive first, by maximum
    daily dose.
    """
    if route is not None:
        return [
            limit
            for limit in limits
            if not limit.routes or route in limit.routes
        ]
    # The knowledge base keeps one drug's limits in one dimension (mass,
    # units, mEq or mmol), so they compare in the first limit's unit.
    unit = limits[0].max_daily.unit

    return sorted(
        limits, key=lambda limit: _in(limit.max_daily, unit), reverse=True
    )


def _limits_for_age(
    limits: list[DoseLimit], patient: cds_pb2.Patient
) -> list[DoseLimit]:
    """Return the pediatric limits that cover the patient's age, if any.

    Otherwise return the limits without an upper age, which also serve a
    patient of unknown age.
    """
    if patient.HasField("age_years"):
        age = patient.age_years
        pediatric = [
            limit
            for limit in limits
            if limit.below_age is not None
            and limit.min_age <= age < limit.below_age
        ]
        if pediatric:
            return pediatric

    return [limit for limit in limits if limit.below_age is None]


def _unrouted_finding(
    medication: ScreenedMedication,
    unit: str,
    limits: list[DoseLimit],
    patient: cds_pb2.Patient,
    gaps: list[cds_pb2.NotScreened],
) -> FindingRecord | None:
    """Check an order without a route against the limit of every route.

    The order may be meant for any of the routes, so it gives a finding
    only when no limit clears it, and then the finding of the most
    permissive limit. The gaps come from that limit alone.
    """
    most, *others = limits
    finding = _check_limit(medication, unit, most, patient, gaps)
    if finding is None:
        return None
    for limit in others:
        # A limit that could not be checked, for the patient's age for
        # example, does not clear the order.
        limit_gaps: list[cds_pb2.NotScreened] = []
        other = _check_limit(medication, unit, limit, patient, limit_gaps)
        if other is None and not limit_gaps:
            return None

    return finding


def dose_findings(
    medications: ScreenedMedications,
    patient: cds_pb2.Patient,
    kb: KnowledgeBase,
    gaps: list[cds_pb2.NotScreened],
) -> Iterator[FindingRecord]:
    """Yield a finding for each medication dosed above its limit."""
    for medication in medications.items:
        limits = kb.index.dose_limits.rules_for(medication.drugs)
        item = medication.item
        if not limits or not item.HasField("dose") or item.dose.value <= 0:
            continue
        subject = medication.subject
        if len(medication.drugs) > 1:
            gaps.append(
                not_screened(
                    subject,
                    "dose of a combination product cannot be assigned to "
                    "each ingredient, so it was not checked",
                )
            )
            continue
        unit = dosing.canonical_unit(item.dose.unit)
        if unit is None:
            gaps.append(
                not_screened(
                    subject,
                    f'dose unit "{item.dose.unit}" not recognized, so the '
                    "dose was not checked: give the amount in g, mg, mcg, "
                    "units, mEq or mmol",
                )
            )
            continue
        route = None
        if item.route.strip():
            route = dosing.canonical_route(item.route)
            if route is None:
                gaps.append(
                    not_screened(
                        subject,
                        f'route "{item.route}" not recognized, so the dose '
                        "was not checked",
                    )
                )
                continue
        route_limits = _limits_for_age(
            _limits_for_route(limits, route), patient
        )
        if not route_limits:
            gaps.append(
                not_screened(
                    subject,
                    f'no dose limit for the route "{item.route}" in the '
                    "knowledge base, so the dose was not checked",
                )
            )
        if route is None and route_limits:
            finding = _unrouted_finding(
                medication, unit, route_limits, patient, gaps
            )
            if finding is not None:
                yield finding
            continue
        for limit in route_limits:
            finding = _check_limit(medication, unit, limit, patient, gaps)
            if finding is not None:
                yield finding


def _daily_problem(
    daily: float, limit: DoseLimit, by_weight: float | None
) -> str:
    unit = limit.max_daily.unit
    maximum = _amount_text(_in(limit.max_daily, unit), unit)
    if by_weight is not None and limit.max_daily_per_kg is not None:
        per_kg = _amount_text(_in(limit.max_daily_per_kg, unit), unit)
        maximum += f" or {per_kg}/kg of body weight, whichever is lower"

    return (
        f"The order allows up to {_amount_text(daily, unit)} a day, above "
        f"the maximum daily dose of {maximum}."
    )


def _weekly_problems(
    dose: float, frequency: dosing.Frequency, limit: DoseLimit
) -> list[str]:
    """Describe how an order exceeds a weekly maximum amount or count.

    `dose` is in the unit of the limit's `max_daily`.
    """
    unit = limit.max_daily.unit
    doses_per_week = frequency.doses_per_day * 7
    problems = []
    if limit.max_weekly is not None:
        weekly = dose * doses_per_week
        max_weekly = _in(limit.max_weekly, unit)
        if weekly > max_weekly * (1 + 1e-9):
            problems.append(
                f"The order allows up to {_amount_text(weekly, unit)} a "
                "week, above the maximum weekly dose of "
                f"{_amount_text(max_weekly, unit)}."
            )
    maximum = limit.max_doses_per_week
    if maximum is not None and doses_per_week > maximum * (1 + 1e-9):
        problems.append(
            f"The order gives up to {doses_per_week:g} doses a week, more "
            f"than the labeled maximum of {maximum} doses a week."
        )

    return problems


def _check_limit(
    medication: ScreenedMedication,
    unit: str,
    limit: DoseLimit,
    patient: cds_pb2.Patient,
    gaps: list[cds_pb2.NotScreened],
) -> FindingRecord | None:
    subject = medication.subject
    limit_unit = limit.max_daily.unit
    dose = dosing.in_unit(medication.item.dose.value, unit, limit_unit)
    if dose is None:
        gaps.append(
            not_screened(
                subject,
                f"dose in {unit} cannot be compared with the limit in "
                f"{limit_unit}, so the dose was not checked",
            )
        )
        return None

    has_weight = patient.HasField("weight_kg")
    by_weight = None
    if limit.max_daily_per_kg is not None and has_weight:
        by_weight = _in(limit.max_daily_per_kg, limit_unit) * patient.weight_kg
    if limit.below_age is not None and limit.max_daily_per_kg is not None:
        if by_weight is None:
            gaps.append(
                not_screened(
                    subject,
                    "weight not given, so the dose was not checked against "
                    "the pediatric maximum per kg",
                )
            )
            return None
    if patient.HasField("age_years") and patient.age_years < limit.min_age:
        if by_weight is None:
            gaps.append(
                not_screened(
                    subject,
                    f"dose limits under {limit.min_age} years are not in "
                    "the knowledge base, so the dose was not checked",
                )
            )
            return None
        max_daily = by_weight
    else:
        max_daily = _in(limit.max_daily, limit_unit)
        if by_weight is not None:
            max_daily = min(max_daily, by_weight)

    problems = []
    if limit.max_single is not None:
        max_single = _in(limit.max_single, limit_unit)
        if dose > max_single:
            problems.append(
                f"A single dose of {_amount_text(dose, limit_unit)} is "
                f"above the maximum of {_amount_text(max_single, limit_unit)}."
            )
    frequency = dosing.parse_frequency(medication.item.frequency)
    if frequency is None and dose > max_daily:
        problems.append(
            f"A single dose of {_amount_text(dose, limit_unit)} is above the "
            "maximum daily dose."
        )
    elif frequency is None:
        reason = "not given"
        if medication.item.frequency.strip():
            reason = f'"{medication.item.frequency}" not recognized'
        gaps.append(
            not_screened(
                subject,
                f"frequency {reason}, so the daily dose was not checked",
            )
        )
    else:
        daily = dose * frequency.doses_per_day
        if daily > max_daily * (1 + 1e-9):
            problems.append(_daily_problem(daily, limit, by_weight))
        problems += _weekly_problems(dose, frequency, limit)
    if not problems:
        return None

    return make_finding(
        DOSE,
        limit.text,
        [subject],
        f"{subject}: {limit.text.summary}",
        " ".join([limit.text.detail, *problems]),
        limit.id,
    )
