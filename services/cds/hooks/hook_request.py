"""Read a CDS Hooks request and build the review of its patient.

The request carries PHI and, in `fhirAuthorization`, an access token to
the EHR's FHIR server. Neither is logged, stored or echoed: the service
reads only the hook, the draft orders and the prefetched resources, and
never calls the FHIR server.
"""

import datetime
import json
from dataclasses import dataclass

from arxio.cds.v1 import cds_pb2
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from services.cds.hooks import fhir
from services.cds.hooks.discovery import REQUIRED_PREFETCH, HookService
from services.cds.hooks.mapping import (
    EGFR_CODES,
    ENDED_MEDICATION_STATUSES,
    PREGNANCY_STATUS_CODE,
    WEIGHT_CODES,
    InvalidFhir,
    MappedReview,
    MedicationOrigin,
    _model,
    check_limits,
    egfr_value,
    latest_observation,
    map_allergy,
    map_condition,
    map_medication,
    map_patient,
    pregnancy_status,
    resources_of,
    weight_kg,
)
from services.cds.knowledge_base import KnowledgeBase
from services.cds.validation import validate_request
from services.common.errors import FieldViolation
from services.common.strict_body import nesting_depth_exceeds

# Deepest nesting of arrays and objects a request may have: far above the
# 11 levels of the example requests in examples/hooks, which leaves room
# for FHIR extensions and contained resources.
MAX_JSON_DEPTH = 64


class MissingPrefetch(Exception):
    """The request lacks prefetch keys that the service needs."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = keys


class HookContext(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    patientId: StrictStr = Field(min_length=1)
    userId: StrictStr | None = None
    selections: list[StrictStr] | None = None
    draftOrders: dict | None = None


class HookRequest(BaseModel):
    """The CDS Hooks request envelope. `fhirAuthorization` is never read."""

    model_config = ConfigDict(extra="allow", strict=True)

    hook: StrictStr
    hookInstance: StrictStr = Field(min_length=1, max_length=200)
    context: HookContext
    prefetch: dict | None = None


def parse_json(data: bytes, content_type: str) -> object:
    """Parse a JSON body, or raise InvalidFhir naming what is wrong."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ("application/json", "application/fhir+json"):
        raise InvalidFhir(
            [
                FieldViolation(
                    "content-type",
                    f"must be application/json, got {media_type[:100]!r}",
                )
            ]
        )
    try:
        text = data.decode("utf-8")
        # Checked first: json.loads would exhaust the stack on deep nesting.
        if nesting_depth_exceeds(text, MAX_JSON_DEPTH):
            raise InvalidFhir(
                [
                    FieldViolation(
                        "body",
                        f"is nested more than {MAX_JSON_DEPTH} levels deep, "
                        "the limit of a CDS Hooks request",
                    )
                ]
            )
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        position = getattr(error, "pos", getattr(error, "start", 0))
        raise InvalidFhir(
            [
                FieldViolation(
                    "body", f"is not valid JSON (at character {position})"
                )
            ]
        ) from None


@dataclass
class _Builder:
    service: HookService
    kb: KnowledgeBase
    mapped: MappedReview
    condition_paths: list[str]
    allergy_paths: list[str]

    def add_medication(
        self,
        resource: fhir.MedicationRequest | fhir.MedicationStatement,
        origin: MedicationOrigin,
    ) -> None:
        if resource.status in ENDED_MEDICATION_STATUSES:
            return
        self.mapped.request.medications.append(
            map_medication(resource, origin.path)
        )
        self.mapped.origins.append(origin)


def _draft_orders(builder: _Builder, context: HookContext) -> frozenset[str]:
    """Add the draft MedicationRequests; return their references."""
    if context.draftOrders is None:
        raise InvalidFhir(
            [
                FieldViolation(
                    "context.draftOrders",
                    f"is required by the {builder.service.hook} hook",
                )
            ]
        )
    selections = None
    if builder.service.hook == "order-select":
        if context.selections is None:
            raise InvalidFhir(
                [
                    FieldViolation(
                        "context.selections",
                        "is required by the order-select hook",
                    )
                ]
            )
        selections = set(context.selections)
    references = set()
    for path, raw in resources_of(context.draftOrders, "context.draftOrders"):
        if raw.get("resourceType") != "MedicationRequest":
            continue
        order = _model(fhir.MedicationRequest, raw, path)
        reference = f"MedicationRequest/{order.id}" if order.id else ""
        selected = selections is None or reference in selections
        builder.add_medication(
            order,
            MedicationOrigin(
                path, draft=True, selected=selected, reference=reference
            ),
        )
        references.add(reference)

    return frozenset(references - {""})


def _prefetched_medications(
    builder: _Builder, prefetch: dict, drafts: frozenset[str]
) -> None:
    models = {
        "MedicationRequest": fhir.MedicationRequest,
        "MedicationStatement": fhir.MedicationStatement,
    }
    for key in ("medications", "medicationStatements"):
        for path, raw in resources_of(prefetch.get(key), f"prefetch.{key}"):
            model = models.get(raw.get("resourceType"))
            if model is None:
                continue
            resource = _model(model, raw, path)
            reference = f"{resource.resourceType}/{resource.id}"
            if reference in drafts:
                # Already screened as a draft order.
                continue
            builder.add_medication(resource, MedicationOrigin(path))


def _problems(builder: _Builder, prefetch: dict) -> None:
    request = builder.mapped.request
    for path, raw in resources_of(
        prefetch.get("conditions"), "prefetch.conditions"
    ):
        if raw.get("resourceType") != "Condition":
            continue
        condition = map_condition(_model(fhir.Condition, raw, path))
        if condition is not None:
            request.conditions.append(condition)
            builder.condition_paths.append(path)
    for path, raw in resources_of(
        prefetch.get("allergies"), "prefetch.allergies"
    ):
        if raw.get("resourceType") != "AllergyIntolerance":
            continue
        allergy = map_allergy(
            _model(fhir.AllergyIntolerance, raw, path), builder.kb
        )
        if allergy is not None:
            request.allergies.append(allergy)
            builder.allergy_paths.append(path)


def _observations(patient: cds_pb2.Patient, prefetch: dict) -> None:
    egfr = latest_observation(prefetch["egfr"], "prefetch.egfr", EGFR_CODES)
    if egfr is not None and (value := egfr_value(egfr)) is not None:
        patient.egfr = value
    weight = latest_observation(
        prefetch["weight"], "prefetch.weight", WEIGHT_CODES
    )
    if weight is not None and (value := weight_kg(weight)) is not None:
        patient.weight_kg = value
    pregnancy = latest_observation(
        prefetch["pregnancy"],
        "prefetch.pregnancy",
        frozenset({PREGNANCY_STATUS_CODE}),
    )
    if pregnancy is not None:
        pregnant = pregnancy_status(pregnancy)
        if pregnant is not None:
            patient.pregnant = pregnant


def _fhir_path(field: str, builder: _Builder) -> str:
    """Translate a review field path to the FHIR location it came from."""
    head, _, rest = field.partition(".")
    sources = {
        "medications": [origin.path for origin in builder.mapped.origins],
        "conditions": builder.condition_paths,
        "allergies": builder.allergy_paths,
    }
    name, _, index = head.partition("[")
    if name in sources and index:
        return f"{sources[name][int(index.rstrip(']'))]} ({rest})"
    patient_fields = {
        "patient.ageYears": "prefetch.patient.birthDate",
        "patient.weightKg": "prefetch.weight",
        "patient.egfr": "prefetch.egfr",
    }

    return patient_fields.get(field, field)


def map_hook_request(
    service: HookService,
    document: object,
    kb: KnowledgeBase,
    today: datetime.date,
) -> MappedReview:
    """Build the review of a hook request.

    Raises MissingPrefetch when a required prefetch key is absent and
    InvalidFhir when the request or a resource it carries is invalid.
    """
    if not isinstance(document, dict):
        raise InvalidFhir([FieldViolation("body", "must be a JSON object")])
    hook = _model(HookRequest, document, "")
    if hook.hook != service.hook:
        raise InvalidFhir(
            [
                FieldViolation(
                    "hook",
                    f"service {service.id} handles the {service.hook} hook, "
                    f"not {hook.hook[:100]!r}",
                )
            ]
        )
    prefetch = hook.prefetch or {}
    missing = sorted(REQUIRED_PREFETCH - set(prefetch))
    if missing:
        raise MissingPrefetch(missing)

    builder = _Builder(
        service,
        kb,
        MappedReview(
            cds_pb2.ClinicalReviewRequest(
                options=cds_pb2.ReviewOptions(model_review=False)
            )
        ),
        [],
        [],
    )
    drafts: frozenset[str] = frozenset()
    if service.orders_hook:
        drafts = _draft_orders(builder, hook.context)
    _prefetched_medications(builder, prefetch, drafts)
    _problems(builder, prefetch)
    request = builder.mapped.request
    request.patient.CopyFrom(
        map_patient(prefetch["patient"], "prefetch.patient", today)
    )
    _observations(request.patient, prefetch)

    check_limits(builder.mapped)
    violations = validate_request(request)
    if violations:
        raise InvalidFhir(
            [
                FieldViolation(
                    _fhir_path(violation.field, builder),
                    violation.description,
                )
                for violation in violations
            ]
        )

    return builder.mapped
