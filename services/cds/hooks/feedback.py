"""Read a CDS Hooks feedback document into rows that hold no PHI.

A row keeps the card's uuid, the rule the card came from, the outcome,
the accepted suggestions' uuids, the override reason's coding and the
outcome time. The clinician's free-text `userComment` may name the
patient, so it is dropped unread.
"""

import datetime
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from services.cds.hooks.cards import (
    MODEL_REVIEW_RULE,
    NOT_SCREENED_RULE,
    OVERRIDE_REASON_CODES,
    OVERRIDE_REASON_SYSTEM,
    RULE_PREFIX_BYTES,
    rule_prefix,
)
from services.cds.hooks.mapping import InvalidFhir, _model
from services.cds.knowledge_base import KnowledgeBase
from services.common.errors import FieldViolation

MAX_FEEDBACK_ITEMS = 100
# UTC as the specification requires: "Z" or a zero offset.
_UTC_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]00:?00)"
)
_TOKEN = r"^[A-Za-z0-9._:\-]+$"
# Cards and suggestions this service hands out are named by UUIDs; any
# other value is client text, which may be patient data, and is rejected.
_UUID = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}$"
)


class FeedbackCoding(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    system: StrictStr = Field(min_length=1, max_length=200)
    code: StrictStr = Field(min_length=1, max_length=100, pattern=_TOKEN)


class OverrideReason(BaseModel):
    # `userComment` is an allowed extra, never read.
    model_config = ConfigDict(extra="allow", strict=True)

    reason: FeedbackCoding | None = None


class AcceptedSuggestion(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    id: StrictStr = Field(min_length=36, max_length=36, pattern=_UUID)


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    card: StrictStr = Field(min_length=36, max_length=36, pattern=_UUID)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] = Field(
        default_factory=list, max_length=20
    )
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: StrictStr


class FeedbackDocument(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    feedback: list[FeedbackItem] = Field(
        min_length=1, max_length=MAX_FEEDBACK_ITEMS
    )


@dataclass(frozen=True)
class FeedbackRow:
    card_uuid: str
    # Knowledge-base rule of the card, or "" when the uuid names none.
    rule_id: str
    outcome: str
    accepted_suggestions: tuple[str, ...]
    override_system: str
    override_code: str
    outcome_time: datetime.datetime


def rule_index(kb: KnowledgeBase) -> dict[bytes, str]:
    """Map each rule's uuid prefix to its id, for reading card uuids."""
    rule_ids = {NOT_SCREENED_RULE, MODEL_REVIEW_RULE}
    rule_ids |= {rule.id for rule in kb.interactions}
    for group in (
        kb.renal_rules,
        kb.condition_rules,
        kb.age_rules,
        kb.pregnancy_rules,
        kb.lactation_rules,
        kb.duplicate_rules,
        kb.dose_limits,
        kb.allergy_classes,
        kb.cross_reactivities,
    ):
        rule_ids |= {getattr(rule, "id", "") for rule in group}
    rule_ids |= {kb.same_ingredient_rule_id, kb.same_drug_allergy.id}

    return {rule_prefix(rule_id): rule_id for rule_id in rule_ids if rule_id}


def _rule_of(card: str, index: dict[bytes, str]) -> str:
    hex_digits = card.replace("-", "")
    try:
        prefix = bytes.fromhex(hex_digits[: RULE_PREFIX_BYTES * 2])
    except ValueError:
        return ""

    return index.get(prefix, "")


def _outcome_time(value: str, path: str) -> datetime.datetime:
    if _UTC_TIMESTAMP.fullmatch(value):
        try:
            return datetime.datetime.fromisoformat(
                value.replace("Z", "+00:00")
            )
        except ValueError:
            pass
    raise InvalidFhir(
        [
            FieldViolation(
                path,
                "must be an ISO 8601 timestamp in UTC, such as "
                "2026-01-31T14:05:00Z",
            )
        ]
    )


def read_feedback(
    document: object, index: dict[bytes, str]
) -> list[FeedbackRow]:
    """Validate a feedback document and return one row per item."""
    if not isinstance(document, dict):
        raise InvalidFhir([FieldViolation("body", "must be a JSON object")])
    parsed = _model(FeedbackDocument, document, "")
    rows = []
    for position, item in enumerate(parsed.feedback):
        path = f"feedback[{position}]"
        if item.outcome == "accepted" and not item.acceptedSuggestions:
            raise InvalidFhir(
                [
                    FieldViolation(
                        f"{path}.acceptedSuggestions",
                        "is required when the outcome is accepted",
                    )
                ]
            )
        reason = item.overrideReason.reason if item.overrideReason else None
        if reason is not None and (
            reason.system != OVERRIDE_REASON_SYSTEM
            or reason.code not in OVERRIDE_REASON_CODES
        ):
            raise InvalidFhir(
                [
                    FieldViolation(
                        f"{path}.overrideReason.reason",
                        "must be one of the override reasons the card "
                        f"offered (system {OVERRIDE_REASON_SYSTEM})",
                    )
                ]
            )
        rows.append(
            FeedbackRow(
                card_uuid=item.card,
                rule_id=_rule_of(item.card, index),
                outcome=item.outcome,
                accepted_suggestions=tuple(
                    s.id for s in item.acceptedSuggestions
                ),
                override_system=reason.system if reason else "",
                override_code=reason.code if reason else "",
                outcome_time=_outcome_time(
                    item.outcomeTimestamp, f"{path}.outcomeTimestamp"
                ),
            )
        )

    return rows
