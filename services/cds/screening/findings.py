"""Findings as plain records until the response needs their messages.

The checks build a `FindingRecord` per finding. Screening removes the
repeats, sorts the records and derives the recommendations and risk from
them, then converts only the unique records to protobuf messages.
Records hash and compare faster than messages, and the conversion starts
from a serialized message of the rule's fixed fields.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase, Source
from services.cds.rules import FindingText
from services.cds.screening.inputs import ScreenedMedication

Finding = cds_pb2.Finding


class FindingRecord(NamedTuple):
    """The fields of a `cds_pb2.Finding`, with the same names.

    Two records are equal exactly when their messages are.
    """

    category: int
    severity: int
    subjects: tuple[str, ...]
    summary: str
    detail: str
    action: str
    source: Source
    rule_id: str


def make_finding(
    category: int,
    text: FindingText,
    subjects: Sequence[str],
    summary: str,
    detail: str,
    rule_id: str,
    severity: int | None = None,
) -> FindingRecord:
    """Build a finding from a rule's text, cited with the rule's source."""
    # Positional arguments, because keywords make a NamedTuple slower to
    # build, and screening builds hundreds per request.
    return FindingRecord(
        category,
        text.severity if severity is None else severity,
        tuple(subjects),
        summary,
        detail,
        text.action,
        text.source,
        rule_id,
    )


def with_ingredients(
    detail: str,
    matches: list[tuple[ScreenedMedication, str]],
    kb: KnowledgeBase,
) -> str:
    """Append which ingredient each brand or product name was matched to.

    Each match is a medication and the drug id it was matched by.
    """
    notes = [
        f"{medication.subject} contains {kb.drugs[drug_id].name}."
        for medication, drug_id in matches
        if medication.words != kb.index.drug_name_words[drug_id]
    ]

    return " ".join([detail, *notes])


# Bounded because a test may load many knowledge bases in one process.
# The keys are knowledge-base entries only, never request data.
@functools.lru_cache(maxsize=4096)
def _fixed_fields(
    category: int, severity: int, action: str, source: Source, rule_id: str
) -> bytes:
    """Serialize the fields that every finding of one rule shares."""
    return Finding(
        category=category,
        severity=severity,
        action=action,
        source=source.to_proto(),
        rule_id=rule_id,
    ).SerializeToString()


def to_message(record: FindingRecord) -> cds_pb2.Finding:
    """Convert a record to the equal protobuf message."""
    finding = Finding.FromString(
        _fixed_fields(
            record.category,
            record.severity,
            record.action,
            record.source,
            record.rule_id,
        )
    )
    finding.subjects.extend(record.subjects)
    finding.summary = record.summary
    finding.detail = record.detail

    return finding
