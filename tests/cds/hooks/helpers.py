"""Hook requests for tests, built from the examples in examples/hooks."""

import copy
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "hooks"
# Identifiers of the made-up patient that must never leave the service.
PATIENT_IDENTIFIERS = (
    "example-patient-1",
    "MRN-000-EXAMPLE",
    "Made",
    "1953-03-14",
    "example-encounter",
    "example-prescriber",
)
SERVICE_OF_HOOK = {
    "order-sign": "arxio-order-sign",
    "order-select": "arxio-order-select",
    "patient-view": "arxio-patient-view",
}


def hook_request(hook: str) -> dict:
    """Return a fresh copy of the example request of a hook."""
    return copy.deepcopy(json.loads((EXAMPLES / f"{hook}.json").read_text()))


def medication_request(
    resource_id: str,
    name: str,
    rxnorm: str = "",
    status: str = "active",
    **extra,
) -> dict:
    concept = {"text": name}
    if rxnorm:
        concept["coding"] = [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": rxnorm,
            }
        ]

    return {
        "resourceType": "MedicationRequest",
        "id": resource_id,
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": concept,
        **extra,
    }


def bundle(*resources: dict) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": resource} for resource in resources],
    }


def observation(code: str, **value) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        **value,
    }


# CDS Hooks 2.0 card attributes: (name, JSON type, required).
CARD_FIELDS = (
    ("uuid", str, False),
    ("summary", str, True),
    ("detail", str, False),
    ("indicator", str, True),
    ("source", dict, True),
    ("suggestions", list, False),
    ("selectionBehavior", str, False),
    ("overrideReasons", list, False),
    ("links", list, False),
)


def card_problems(response: dict) -> list[str]:
    """Check a hook response against the CDS Hooks 2.0 response schema."""
    problems = []
    if set(response) - {"cards", "systemActions"}:
        problems.append(f"unknown response fields {set(response)}")
    if not isinstance(response.get("cards"), list):
        return problems + ["cards is not an array"]
    known = {name for name, _, _ in CARD_FIELDS}
    for index, card in enumerate(response["cards"]):
        where = f"cards[{index}]"
        for name, kind, required in CARD_FIELDS:
            if name in card and not isinstance(card[name], kind):
                problems.append(f"{where}.{name} is not {kind.__name__}")
            if required and name not in card:
                problems.append(f"{where}.{name} is missing")
            if name in card and card[name] in ("", [], {}, None):
                problems.append(f"{where}.{name} is empty")
        if set(card) - known:
            problems.append(f"{where} has unknown fields {set(card) - known}")
        if len(card.get("summary", "")) >= 140:
            problems.append(f"{where}.summary has 140 characters or more")
        if card.get("indicator") not in ("info", "warning", "critical"):
            problems.append(f"{where}.indicator is not a known value")
        if not card.get("source", {}).get("label"):
            problems.append(f"{where}.source.label is missing")
        if "suggestions" in card and card.get("selectionBehavior") not in (
            "at-most-one",
            "any",
        ):
            problems.append(f"{where} has suggestions but no selection")
        for suggestion in card.get("suggestions", []):
            if not suggestion.get("label"):
                problems.append(f"{where} has a suggestion without label")
            for action in suggestion.get("actions", []):
                if action.get("type") not in ("create", "update", "delete"):
                    problems.append(f"{where} has an unknown action type")
                if not action.get("description"):
                    problems.append(f"{where} has an action without text")
        for reason in card.get("overrideReasons", []):
            if not {"code", "system", "display"} <= set(reason):
                problems.append(f"{where} has an incomplete override reason")

    return problems
