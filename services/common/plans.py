"""Plans and their daily request limits, read from plans.json."""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from arxio.auth.v1 import organization_pb2

Plan = organization_pb2.Organization.Plan


@dataclass(frozen=True)
class PlanLimits:
    name: str
    # Requests per UTC day, or None for unlimited.
    daily_request_limit: int | None


@cache
def plan_limits() -> dict[str, PlanLimits]:
    """Return each plan's limits by lowercase name (`free`, `pro`, ...)."""
    path = Path(__file__).with_name("plans.json")
    plans = json.loads(path.read_text())["plans"]

    return {
        name: PlanLimits(name, entry["daily_request_limit"])
        for name, entry in plans.items()
    }


def plan_name(plan: int) -> str:
    """Convert an `Organization.Plan` value to its stored name."""
    if plan == Plan.PLAN_UNSPECIFIED:
        raise ValueError("plan is unspecified: use free, pro or enterprise")

    return Plan.Name(plan).lower()


def plan_value(name: str) -> int:
    return Plan.Value(name.upper())
