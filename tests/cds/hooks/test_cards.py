"""Cards built from screening findings, checked against CDS Hooks 2.0."""

import datetime
import json

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds.hooks import cards
from services.cds.hooks.discovery import (
    REQUIRED_PREFETCH,
    SERVICES,
    discovery_document,
)
from services.cds.hooks.hook_request import map_hook_request
from services.cds.knowledge_base import load_knowledge_base
from services.cds.screening import screen
from tests.cds.hooks.helpers import (
    PATIENT_IDENTIFIERS,
    SERVICE_OF_HOOK,
    card_problems,
    hook_request,
)

TODAY = datetime.date(2026, 12, 1)
Severity = cds_pb2.Finding.Severity


@pytest.fixture(scope="module")
def kb():
    return load_knowledge_base()


def _cards(kb, hook: str, document: dict | None = None) -> list[dict]:
    service = SERVICES[SERVICE_OF_HOOK[hook]]
    mapped = map_hook_request(
        service, document or hook_request(hook), kb, TODAY
    )

    return cards.build_cards(
        service, mapped, screen(mapped.request, kb), kb.version
    )


class TestCards:
    @pytest.mark.parametrize("hook", sorted(SERVICE_OF_HOOK))
    def test_response_fits_schema(self, kb, hook):
        """Every example's response follows the CDS Hooks card schema."""
        assert [] == card_problems({"cards": _cards(kb, hook)})

    @pytest.mark.parametrize("hook", sorted(SERVICE_OF_HOOK))
    def test_no_identifier_echoed(self, kb, hook):
        """No name, MRN, patient id or birth date appears in a card."""
        text = json.dumps(_cards(kb, hook))

        for identifier in PATIENT_IDENTIFIERS:
            assert identifier not in text

    def test_order_sign_suggests_removal(self, kb):
        """An interaction with a new order suggests deleting that order."""
        found = _cards(kb, "order-sign")
        interaction = next(
            card
            for card in found
            if card["source"]["topic"]["code"].startswith("ddi.")
        )

        assert "critical" == interaction["indicator"]
        assert "at-most-one" == interaction["selectionBehavior"]
        action = interaction["suggestions"][0]["actions"][0]
        assert "delete" == action["type"]
        assert "MedicationRequest/draft-aspirin" == action["resourceId"]
        assert interaction["overrideReasons"]

    def test_order_select_only_selected_orders(self, kb):
        """order-select reports findings of the selected order only."""
        found = _cards(kb, "order-select")
        subjects = " ".join(card["summary"] for card in found)

        assert "aspirin" in subjects
        assert "metformin" not in subjects

    def test_patient_view_has_no_suggestions(self, kb):
        """Without draft orders there is nothing to remove."""
        for card in _cards(kb, "patient-view"):
            assert "suggestions" not in card

    def test_source_names_kb_version(self, kb):
        """Each card's source label carries the knowledge-base version."""
        for card in _cards(kb, "order-sign"):
            assert kb.version in card["source"]["label"]

    def test_unrecognized_new_order_reported(self, kb):
        """A new order the engine cannot read gets an info card."""
        document = hook_request("order-sign")
        entry = document["context"]["draftOrders"]["entry"][1]["resource"]
        entry["medicationCodeableConcept"] = {"text": "zzzunknownium"}

        found = _cards(kb, "order-sign", document)
        gaps = [
            c for c in found if c["source"]["topic"]["code"] == "not-screened"
        ]

        assert 1 == len(gaps)
        assert "zzzunknownium" in gaps[0]["detail"]


class TestCardParts:
    @pytest.mark.parametrize(
        ("severity", "indicator"),
        [
            (Severity.CONTRAINDICATED, "critical"),
            (Severity.MAJOR, "critical"),
            (Severity.MODERATE, "warning"),
            (Severity.MINOR, "info"),
            (Severity.INFO, "info"),
        ],
    )
    def test_indicator_of_severity(self, severity, indicator):
        """Severities map to the three CDS Hooks indicators."""
        assert indicator == cards.INDICATOR_OF_SEVERITY[severity]

    def test_summary_shortened_below_140(self):
        """Long summaries are cut at a word and marked."""
        summary = cards.shorten("word " * 60)

        assert len(summary) < 140
        assert summary.endswith("…")

    def test_card_uuid_names_rule(self):
        """A card uuid starts with its rule's prefix and is a UUIDv8."""
        first = cards.card_uuid("ddi.example")
        second = cards.card_uuid("ddi.example")

        assert first != second
        assert first[:8] == second[:8]
        assert "8" == first[14]

    def test_markdown_escaped(self):
        """EHR text cannot inject links, images or HTML into detail."""
        escaped = cards.escape_markdown(
            "![x](https://evil.example) <img> www.evil.example"
        )

        assert "](" not in escaped
        assert "<img>" not in escaped
        assert "://" not in escaped
        assert "www." not in escaped


class TestDiscovery:
    def test_three_services_with_prefetch(self):
        """Discovery lists order-select, order-sign and patient-view."""
        services = discovery_document()["services"]

        assert {"order-select", "order-sign", "patient-view"} == {
            service["hook"] for service in services
        }
        for service in services:
            assert REQUIRED_PREFETCH <= set(service["prefetch"])
            assert service["description"]

    def test_observation_templates_use_loinc(self):
        """eGFR, weight and pregnancy ask for the latest LOINC result."""
        prefetch = discovery_document()["services"][0]["prefetch"]

        assert "http://loinc.org|98979-8" in prefetch["egfr"]
        assert "http://loinc.org|29463-7" in prefetch["weight"]
        assert "http://loinc.org|82810-3" in prefetch["pregnancy"]
        assert "_count=1" in prefetch["egfr"]
