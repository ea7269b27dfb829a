"""Turn screening findings into CDS Hooks cards.

A card's text comes from the knowledge base and from the medication,
condition and allergy names the EHR sent, never from identifiers. The
only resource reference a card carries is a draft order's own id, in a
suggestion to remove that order.
"""

import hashlib
import re
import secrets
import uuid
from collections.abc import Iterable

from arxio.cds.v1 import cds_pb2

from services.cds.hooks.discovery import HookService
from services.cds.hooks.mapping import MappedReview, MedicationOrigin
from services.cds.screening import ScreeningResult

Finding = cds_pb2.Finding
Severity = Finding.Severity

# CDS Hooks indicators in order of urgency: info, warning, critical.
INDICATOR_OF_SEVERITY = {
    Severity.CONTRAINDICATED: "critical",
    Severity.MAJOR: "critical",
    Severity.MODERATE: "warning",
    Severity.MINOR: "info",
    Severity.INFO: "info",
    Severity.SEVERITY_UNSPECIFIED: "info",
}
# The specification requires a summary of fewer than 140 characters.
MAX_SUMMARY_LENGTH = 139
TOPIC_SYSTEM = "https://arxio.dev/cds-hooks/CodeSystem/rule"
OVERRIDE_REASON_SYSTEM = (
    "https://arxio.dev/cds-hooks/CodeSystem/override-reason"
)
OVERRIDE_REASONS = (
    ("benefit-outweighs-risk", "Benefit outweighs the risk for this patient"),
    ("tolerated-before", "Patient has tolerated this therapy before"),
    ("will-monitor", "Will monitor the patient or adjust the dose"),
    ("not-applicable", "Alert does not apply to this patient"),
)
OVERRIDE_REASON_CODES = frozenset(code for code, _ in OVERRIDE_REASONS)
# Topic code of the card that lists what could not be screened.
NOT_SCREENED_RULE = "not-screened"
MODEL_REVIEW_RULE = "model-review"
# Bytes of SHA-256(rule id) at the start of a card's uuid (48 bits): they
# let feedback name the rule without storing the cards handed out.
RULE_PREFIX_BYTES = 6

# Characters that start emphasis, code, links, images, HTML or tables.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()<>!|~#])")
# GitHub Flavored Markdown also links bare URLs and "www." names.
_BARE_LINK = re.compile(r"(?i)(://|\bwww\.)")


def escape_markdown(text: str) -> str:
    """Escape Markdown syntax, so EHR text cannot add links or images."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", text)

    return _BARE_LINK.sub(
        lambda match: match.group(1).replace("/", "\\/").replace(".", "\\."),
        escaped,
    )


def rule_prefix(rule_id: str) -> bytes:
    return hashlib.sha256(rule_id.encode()).digest()[:RULE_PREFIX_BYTES]


def card_uuid(rule_id: str) -> str:
    """Return a new UUIDv8 whose first 48 bits identify the rule."""
    raw = bytearray(rule_prefix(rule_id) + secrets.token_bytes(10))
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant

    return str(uuid.UUID(bytes=bytes(raw)))


def shorten(text: str, limit: int = MAX_SUMMARY_LENGTH) -> str:
    """Cut text to `limit` characters at a word boundary, marking the cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:")

    return cut + "…"


def _source(finding: Finding, kb_version: str) -> dict:
    label = finding.source.label or "arxio screening"
    source = {
        "label": f"{label} (arxio knowledge base {kb_version})",
        "topic": {
            "system": TOPIC_SYSTEM,
            "code": finding.rule_id,
            "display": Finding.Category.Name(finding.category)
            .replace("_", " ")
            .lower(),
        },
    }
    if finding.source.url.startswith("https://"):
        source["url"] = finding.source.url

    return source


def _detail(finding: Finding) -> str:
    parts = [escape_markdown(finding.detail)]
    if finding.action:
        parts.append(
            f"**Recommended action:** {escape_markdown(finding.action)}"
        )
    if finding.source.citation:
        parts.append(f"*Source:* {escape_markdown(finding.source.citation)}")

    return "\n\n".join(parts)


def _removal_suggestions(
    finding: Finding, drafts: dict[str, list[MedicationOrigin]]
) -> list[dict]:
    """Suggest removing each new order that the finding involves."""
    suggestions = []
    for subject in dict.fromkeys(finding.subjects):
        for origin in drafts.get(subject, []):
            suggestions.append(
                {
                    "label": shorten(f"Remove the new order for {subject}"),
                    "uuid": str(uuid.uuid4()),
                    "isRecommended": finding.severity
                    >= Severity.CONTRAINDICATED,
                    "actions": [
                        {
                            "type": "delete",
                            "description": shorten(
                                f"Remove the draft order for {subject}"
                            ),
                            "resourceId": origin.reference,
                        }
                    ],
                }
            )

    return suggestions


def finding_card(
    finding: Finding,
    kb_version: str,
    drafts: dict[str, list[MedicationOrigin]],
) -> dict:
    indicator = INDICATOR_OF_SEVERITY[finding.severity]
    card = {
        "uuid": card_uuid(finding.rule_id),
        "summary": shorten(finding.summary),
        "detail": _detail(finding),
        "indicator": indicator,
        "source": _source(finding, kb_version),
    }
    suggestions = _removal_suggestions(finding, drafts)
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "at-most-one"
    if indicator != "info":
        card["overrideReasons"] = [
            {"system": OVERRIDE_REASON_SYSTEM, "code": code, "display": text}
            for code, text in OVERRIDE_REASONS
        ]

    return card


def not_screened_card(
    gaps: Iterable[cds_pb2.NotScreened], kb_version: str
) -> dict | None:
    """One info card listing what could not be screened, if anything."""
    lines = [
        f"- {escape_markdown(gap.subject)}: {escape_markdown(gap.reason)}"
        for gap in gaps
    ]
    if not lines:
        return None

    return {
        "uuid": card_uuid(NOT_SCREENED_RULE),
        "summary": shorten(
            f"{len(lines)} item(s) could not be fully screened: review "
            "them by hand"
        ),
        "detail": "\n".join(lines),
        "indicator": "info",
        "source": {
            "label": f"arxio screening (arxio knowledge base {kb_version})",
            "topic": {
                "system": TOPIC_SYSTEM,
                "code": NOT_SCREENED_RULE,
                "display": "not screened",
            },
        },
    }


def model_review_card(review: cds_pb2.ModelReview) -> dict | None:
    """An info card with the model's narrative, marked as generated."""
    if review.status != cds_pb2.ModelReview.OK or not review.summary:
        return None

    return {
        "uuid": card_uuid(MODEL_REVIEW_RULE),
        "summary": "Model-generated review: not a screened finding",
        "detail": escape_markdown(review.summary),
        "indicator": "info",
        "source": {
            "label": shorten(f"arxio model review ({review.model})"),
            "topic": {
                "system": TOPIC_SYSTEM,
                "code": MODEL_REVIEW_RULE,
                "display": "model review",
            },
        },
    }


# Patient-level checks that no single medication names as its subject.
PATIENT_CHECKS = frozenset(
    {
        "renal dosing",
        "age screening",
        "pregnancy screening",
        "lactation screening",
    }
)


def build_cards(
    service: HookService,
    mapped: MappedReview,
    screening: ScreeningResult,
    kb_version: str,
    model_review: cds_pb2.ModelReview | None = None,
) -> list[dict]:
    """Return the cards of one hook call, most severe first.

    Order hooks get the findings that involve a selected new order; the
    patient-view hook gets every finding.
    """
    subjects: dict[str, list[MedicationOrigin]] = {}
    for medication, origin in zip(
        mapped.request.medications, mapped.origins, strict=True
    ):
        subject = medication.name.strip() or medication.rxnorm
        subjects.setdefault(subject, []).append(origin)
    selected = {
        subject
        for subject, origins in subjects.items()
        if any(origin.selected for origin in origins)
    }
    removable = {
        subject: [o for o in origins if o.selected and o.reference]
        for subject, origins in subjects.items()
    }

    findings = screening.findings
    gaps = screening.not_screened
    if service.orders_hook:
        findings = [f for f in findings if selected & set(f.subjects)]
        gaps = [
            gap
            for gap in gaps
            if gap.subject in selected or gap.subject in PATIENT_CHECKS
        ]
    cards = [finding_card(f, kb_version, removable) for f in findings]
    extra = [not_screened_card(gaps, kb_version)]
    if model_review is not None:
        extra.append(model_review_card(model_review))

    return cards + [card for card in extra if card is not None]
