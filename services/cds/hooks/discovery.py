"""The CDS services this deployment offers and their prefetch templates."""

from dataclasses import dataclass

from services.cds.hooks.mapping import (
    EGFR_CODES,
    LOINC,
    PREGNANCY_STATUS_CODE,
    WEIGHT_CODES,
)


def _latest_observation(codes: frozenset[str] | set[str]) -> str:
    # A comma in a FHIR token search means "any of"; one result, newest
    # first, is the latest value.
    tokens = ",".join(f"{LOINC}|{code}" for code in sorted(codes))

    return (
        "Observation?patient={{context.patientId}}"
        f"&code={tokens}&_sort=-date&_count=1"
    )


PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "medications": (
        "MedicationRequest?patient={{context.patientId}}&status=active"
    ),
    "medicationStatements": (
        "MedicationStatement?patient={{context.patientId}}&status=active"
    ),
    "conditions": (
        "Condition?patient={{context.patientId}}&clinical-status=active"
    ),
    "allergies": (
        "AllergyIntolerance?patient={{context.patientId}}"
        "&clinical-status=active"
    ),
    "egfr": _latest_observation(EGFR_CODES),
    "weight": _latest_observation(WEIGHT_CODES),
    "pregnancy": _latest_observation({PREGNANCY_STATUS_CODE}),
}
# Keys a call must carry, each with data or null, or it gets 412. An EHR
# that keeps no MedicationStatement may leave that key out.
REQUIRED_PREFETCH = frozenset(PREFETCH) - {"medicationStatements"}


@dataclass(frozen=True)
class HookService:
    id: str
    hook: str
    title: str
    description: str

    @property
    def orders_hook(self) -> bool:
        """Tell whether the hook carries draft orders in its context."""
        return self.hook in ("order-select", "order-sign")

    def discovery_entry(self) -> dict:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": dict(PREFETCH),
        }


SERVICES = {
    service.id: service
    for service in (
        HookService(
            id="arxio-order-select",
            hook="order-select",
            title="Medication safety screening of selected orders",
            description=(
                "Screens the newly selected medication orders against the "
                "patient's active medications, conditions, allergies, age, "
                "pregnancy status, eGFR and weight: interactions, allergy "
                "and cross-sensitivity conflicts, contraindications, "
                "duplicate therapy and dose limits."
            ),
        ),
        HookService(
            id="arxio-order-sign",
            hook="order-sign",
            title="Medication safety screening before signing",
            description=(
                "Screens every draft medication order before it is signed, "
                "with the same checks as order selection, and suggests "
                "removing a new order that causes a finding."
            ),
        ),
        HookService(
            id="arxio-patient-view",
            hook="patient-view",
            title="Medication safety review of the chart",
            description=(
                "Screens the patient's active medications against their "
                "conditions, allergies, age, pregnancy status, eGFR and "
                "weight when the chart is opened."
            ),
        ),
    )
}


def discovery_document() -> dict:
    return {
        "services": [
            service.discovery_entry() for service in SERVICES.values()
        ]
    }
