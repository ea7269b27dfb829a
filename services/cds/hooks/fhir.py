"""FHIR R4 resources as the hooks read them, checked with pydantic.

Each model declares the elements the mapping reads, with FHIR R4's JSON
types, formats and required value sets, so a resource whose read elements
are invalid is rejected. Every other element is allowed and never read,
so identifiers, names and narrative pass through unexamined.

NOTE: elements the mapping does not read are not validated; a full FHIR
validator would also reject a resource whose unread elements are invalid.
"""

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

# Primitive formats from the FHIR R4 datatypes page (hl7.org/fhir/R4).
_CODE = re.compile(r"[^\s]+( [^\s]+)*")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DATE = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
    r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
)
_DATE_TIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
    r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
    r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)


def _matching(pattern: re.Pattern[str], kind: str):
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"is not a valid FHIR {kind}")

        return value

    return AfterValidator(check)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain a non-whitespace character")

    return value


String = Annotated[str, AfterValidator(_non_blank)]
Code = Annotated[str, _matching(_CODE, "code")]
Id = Annotated[str, _matching(_ID, "id")]
Date = Annotated[str, _matching(_DATE, "date")]
DateTime = Annotated[str, _matching(_DATE_TIME, "dateTime")]
# FHIR decimals are JSON numbers; strict mode keeps "5" and true out.
Decimal = int | float


class Element(BaseModel):
    # Strict: no string-to-number coercion. Extra elements are allowed and
    # ignored, as FHIR's open-ended JSON needs.
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class Coding(Element):
    system: String | None = None
    code: Code | None = None
    display: String | None = None


class CodeableConcept(Element):
    coding: list[Coding] = Field(default_factory=list)
    text: String | None = None

    def codes(self, system: str) -> list[str]:
        """Return the codes of this concept in one code system."""
        return [
            coding.code
            for coding in self.coding
            if coding.system == system and coding.code
        ]

    def label(self) -> str:
        """Return the text, or else the first coding's display."""
        if self.text:
            return self.text
        for coding in self.coding:
            if coding.display:
                return coding.display

        return ""


class Quantity(Element):
    value: Decimal | None = None
    unit: String | None = None
    system: String | None = None
    code: Code | None = None


class Reference(Element):
    reference: String | None = None
    display: String | None = None


class TimingRepeat(Element):
    frequency: int | None = Field(default=None, ge=1)
    period: Decimal | None = None
    periodUnit: Literal["s", "min", "h", "d", "wk", "mo", "a"] | None = None


class Timing(Element):
    repeat: TimingRepeat | None = None
    code: CodeableConcept | None = None


class DoseAndRate(Element):
    doseQuantity: Quantity | None = None


class Dosage(Element):
    text: String | None = None
    asNeededBoolean: bool | None = None
    timing: Timing | None = None
    route: CodeableConcept | None = None
    doseAndRate: list[DoseAndRate] = Field(default_factory=list)


class Medication(Element):
    resourceType: Literal["Medication"]
    id: Id | None = None
    code: CodeableConcept | None = None


class _MedicationHolder(Element):
    """Shared shape of MedicationRequest and MedicationStatement."""

    id: Id | None = None
    medicationCodeableConcept: CodeableConcept | None = None
    medicationReference: Reference | None = None
    contained: list[dict] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_medication(self):
        given = [
            self.medicationCodeableConcept is not None,
            self.medicationReference is not None,
        ]
        if sum(given) != 1:
            raise ValueError(
                "needs exactly one of medicationCodeableConcept and "
                "medicationReference"
            )

        return self

    def medication_concept(self) -> CodeableConcept | None:
        """Return the medication's concept, from a contained Medication
        when the resource references one by `#id`."""
        if self.medicationCodeableConcept is not None:
            return self.medicationCodeableConcept
        reference = self.medicationReference.reference or ""
        if reference.startswith("#"):
            for raw in self.contained:
                if (
                    isinstance(raw, dict)
                    and raw.get("resourceType") == "Medication"
                    and raw.get("id") == reference[1:]
                ):
                    return Medication.model_validate(raw).code
        if self.medicationReference.display:
            return CodeableConcept(text=self.medicationReference.display)

        return None


class MedicationRequest(_MedicationHolder):
    resourceType: Literal["MedicationRequest"]
    status: Literal[
        "active",
        "on-hold",
        "cancelled",
        "completed",
        "entered-in-error",
        "stopped",
        "draft",
        "unknown",
    ]
    intent: Literal[
        "proposal",
        "plan",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    ]
    dosageInstruction: list[Dosage] = Field(default_factory=list)

    def dosages(self) -> list[Dosage]:
        return self.dosageInstruction


class MedicationStatement(_MedicationHolder):
    resourceType: Literal["MedicationStatement"]
    status: Literal[
        "active",
        "completed",
        "entered-in-error",
        "intended",
        "stopped",
        "on-hold",
        "unknown",
        "not-taken",
    ]
    dosage: list[Dosage] = Field(default_factory=list)

    def dosages(self) -> list[Dosage]:
        return self.dosage


class Patient(Element):
    resourceType: Literal["Patient"]
    gender: Literal["male", "female", "other", "unknown"] | None = None
    birthDate: Date | None = None


class Condition(Element):
    resourceType: Literal["Condition"]
    clinicalStatus: CodeableConcept | None = None
    verificationStatus: CodeableConcept | None = None
    code: CodeableConcept | None = None


class AllergyReaction(Element):
    manifestation: list[CodeableConcept] = Field(min_length=1)
    severity: Literal["mild", "moderate", "severe"] | None = None


class AllergyIntolerance(Element):
    resourceType: Literal["AllergyIntolerance"]
    clinicalStatus: CodeableConcept | None = None
    verificationStatus: CodeableConcept | None = None
    code: CodeableConcept | None = None
    criticality: Literal["low", "high", "unable-to-assess"] | None = None
    reaction: list[AllergyReaction] = Field(default_factory=list)


class Observation(Element):
    resourceType: Literal["Observation"]
    status: Literal[
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    ]
    code: CodeableConcept
    effectiveDateTime: DateTime | None = None
    issued: String | None = None
    valueQuantity: Quantity | None = None
    valueCodeableConcept: CodeableConcept | None = None

    def time(self) -> str:
        """Return when the result applies, for picking the latest."""
        return self.effectiveDateTime or self.issued or ""


class BundleEntry(Element):
    resource: dict | None = None


class Bundle(Element):
    resourceType: Literal["Bundle"]
    type: (
        Literal[
            "document",
            "message",
            "transaction",
            "transaction-response",
            "batch",
            "batch-response",
            "history",
            "searchset",
            "collection",
        ]
        | None
    ) = None
    entry: list[BundleEntry] = Field(default_factory=list)
