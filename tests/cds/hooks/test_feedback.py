"""Feedback documents read into rows without PHI."""

import datetime

import pytest

from services.cds.hooks import cards
from services.cds.hooks.feedback import read_feedback, rule_index
from services.cds.hooks.mapping import InvalidFhir
from services.cds.knowledge_base import load_knowledge_base


@pytest.fixture(scope="module")
def index():
    return rule_index(load_knowledge_base())


def _item(**fields) -> dict:
    return {
        "card": cards.card_uuid("ddi.anticoagulants-antiplatelets"),
        "outcome": "overridden",
        "outcomeTimestamp": "2026-11-02T09:15:00Z",
        **fields,
    }


class TestReadFeedback:
    def test_override_with_reason(self, index):
        """An override keeps its coded reason and the card's rule."""
        rows = read_feedback(
            {
                "feedback": [
                    _item(
                        overrideReason={
                            "reason": {
                                "system": cards.OVERRIDE_REASON_SYSTEM,
                                "code": "will-monitor",
                            },
                            "userComment": "Jane Doe said she is fine",
                        }
                    )
                ]
            },
            index,
        )

        assert 1 == len(rows)
        assert "ddi.anticoagulants-antiplatelets" == rows[0].rule_id
        assert "will-monitor" == rows[0].override_code
        assert (
            datetime.datetime(2026, 11, 2, 9, 15, tzinfo=datetime.UTC)
            == rows[0].outcome_time
        )

    def test_user_comment_never_kept(self, index):
        """The free-text comment appears nowhere in the row."""
        rows = read_feedback(
            {
                "feedback": [
                    _item(overrideReason={"userComment": "Jane Doe, MRN 42"})
                ]
            },
            index,
        )

        assert "Jane" not in repr(rows)
        assert "" == rows[0].override_code

    def test_accepted_needs_suggestions(self, index):
        """accepted without acceptedSuggestions is invalid."""
        with pytest.raises(InvalidFhir, match="acceptedSuggestions"):
            read_feedback({"feedback": [_item(outcome="accepted")]}, index)

    def test_accepted_suggestions_kept(self, index):
        """Accepted suggestion uuids are stored."""
        rows = read_feedback(
            {
                "feedback": [
                    _item(
                        outcome="accepted",
                        acceptedSuggestions=[
                            {"id": "0b6c5e1a-2f43-4d1e-9a57-1c2d3e4f5a6b"}
                        ],
                    )
                ]
            },
            index,
        )

        assert ("0b6c5e1a-2f43-4d1e-9a57-1c2d3e4f5a6b",) == rows[
            0
        ].accepted_suggestions

    @pytest.mark.parametrize(
        "item",
        [
            {"outcome": "ignored"},
            {"outcomeTimestamp": "2026-11-02T09:15:00+02:00"},
            {"outcomeTimestamp": "yesterday"},
            {"card": "has spaces and a name"},
        ],
    )
    def test_invalid_items_rejected(self, index, item):
        """Unknown outcomes, non-UTC times and odd card ids are invalid."""
        with pytest.raises(InvalidFhir):
            read_feedback({"feedback": [_item(**item)]}, index)

    def test_empty_feedback_rejected(self, index):
        """A feedback array must carry at least one item."""
        with pytest.raises(InvalidFhir):
            read_feedback({"feedback": []}, index)

    def test_unknown_card_has_no_rule(self, index):
        """A card uuid from elsewhere is kept without a rule."""
        rows = read_feedback(
            {"feedback": [_item(card="4e0a3a1e-3283-4575-ab82-028d55fe2719")]},
            index,
        )

        assert "" == rows[0].rule_id


class TestClientTextRejected:
    """Only values this service handed out are stored: never client text."""

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"card": "zzphimarkercard"}, "card"),
            (
                {
                    "outcome": "accepted",
                    "acceptedSuggestions": [{"id": "zzphimarkersugg"}],
                },
                "acceptedSuggestions",
            ),
            (
                {
                    "outcome": "overridden",
                    "overrideReason": {
                        "reason": {
                            "system": "urn:zzphimarker",
                            "code": "zzphimarkercode",
                        }
                    },
                },
                "overrideReason",
            ),
        ],
    )
    def test_unknown_values_rejected(self, index, change, field):
        with pytest.raises(InvalidFhir) as raised:
            read_feedback({"feedback": [_item(**change)]}, index)

        assert field in str(raised.value)
