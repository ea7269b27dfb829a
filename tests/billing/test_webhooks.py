"""Webhook signatures made by the Stripe SDK's own signing helper, and the
events billing reads from them."""

import datetime
import json
import time

import pytest
import stripe

from services.billing import webhooks
from services.billing.webhooks import InvalidWebhook, verify_event

SECRET = "whsec_test_" + "a" * 32
TOLERANCE = 300
ORG_ID = "0b6f2c1e-5d7a-4c39-9a8e-3f1d2b4c5e6f"


def event_body(**changes) -> bytes:
    event = {
        "id": "evt_1",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": 1_790_000_000,
        "data": {
            "object": {
                "id": "sub_1",
                "object": "subscription",
                "customer": "cus_1",
                "status": "active",
                "metadata": {"org_id": ORG_ID},
                "items": {"data": [{"price": {"id": "price_pro"}}]},
            }
        },
    } | changes

    # Indented, with non-ASCII text: bytes a re-encoding would change.
    return json.dumps(event, indent=2, ensure_ascii=False).encode()


def sign(body: bytes, timestamp: int | None = None, secret=SECRET) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp
    )


class TestVerifyEvent:
    def test_valid_signature(self):
        body = event_body()

        event = verify_event(body, sign(body), SECRET, TOLERANCE)

        assert "evt_1" == event.event_id
        assert "customer.subscription.updated" == event.event_type
        assert "sub_1" == event.data["id"]
        assert (
            datetime.datetime(2026, 9, 21, 14, 13, 20, tzinfo=datetime.UTC)
            == event.time
        )

    def test_non_ascii_body_verifies(self):
        body = event_body(
            data={"object": {"id": "cus_1", "name": "Klinik Zürich"}}
        )

        event = verify_event(body, sign(body), SECRET, TOLERANCE)

        assert "Klinik Zürich" == event.data["name"]

    def test_changed_byte_rejected(self):
        body = event_body()
        header = sign(body)
        changed = body.replace(b'"active"', b'"activf"')

        with pytest.raises(InvalidWebhook, match="invalid Stripe signature"):
            verify_event(changed, header, SECRET, TOLERANCE)

    def test_reformatted_body_rejected(self):
        """Re-encoding the same JSON, as a transcoder would, breaks it."""
        body = event_body()
        compact = json.dumps(json.loads(body)).encode()

        with pytest.raises(InvalidWebhook, match="invalid Stripe signature"):
            verify_event(compact, sign(body), SECRET, TOLERANCE)

    def test_missing_header_rejected(self):
        with pytest.raises(InvalidWebhook, match="missing Stripe-Signature"):
            verify_event(event_body(), "", SECRET, TOLERANCE)

    def test_malformed_header_rejected(self):
        with pytest.raises(InvalidWebhook, match="invalid Stripe signature"):
            verify_event(event_body(), "v1=abc", SECRET, TOLERANCE)

    def test_other_secret_rejected(self):
        body = event_body()
        header = sign(body, secret="whsec_other")

        with pytest.raises(InvalidWebhook, match="invalid Stripe signature"):
            verify_event(body, header, SECRET, TOLERANCE)

    def test_old_timestamp_rejected(self):
        body = event_body()
        header = sign(body, int(time.time()) - TOLERANCE - 10)

        with pytest.raises(InvalidWebhook, match="tolerance"):
            verify_event(body, header, SECRET, TOLERANCE)

    def test_future_timestamp_rejected(self):
        body = event_body()
        header = sign(body, int(time.time()) + TOLERANCE + 10)

        with pytest.raises(InvalidWebhook, match="in the future"):
            verify_event(body, header, SECRET, TOLERANCE)

    def test_timestamps_within_tolerance_pass(self):
        body = event_body()
        now = time.time()

        for offset in (-TOLERANCE + 5, 0, TOLERANCE - 5):
            header = sign(body, int(now) + offset)
            event = verify_event(body, header, SECRET, TOLERANCE, now=now)
            assert "evt_1" == event.event_id

    def test_non_utf8_body_rejected(self):
        body = b"\xff\xfe{}"
        header = f"t={int(time.time())},v1={'0' * 64}"

        with pytest.raises(InvalidWebhook):
            verify_event(body, header, SECRET, TOLERANCE)

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"[]",
            b'{"object": "customer", "id": "cus_1"}',
            b'{"object": "event", "id": "evt_1", "type": "x", "created": 1}',
        ],
    )
    def test_signed_non_event_rejected(self, body):
        with pytest.raises(InvalidWebhook, match="invalid body"):
            verify_event(body, sign(body), SECRET, TOLERANCE)


def stripe_event(event_type: str, data: dict, created=1_790_000_000):
    return webhooks.StripeEvent(
        event_id="evt_1",
        event_type=event_type,
        time=datetime.datetime.fromtimestamp(created, datetime.UTC),
        data=data,
    )


class TestSubscriptionChange:
    def test_subscription_updated(self):
        event = webhooks.parse_event(event_body())

        change = webhooks.subscription_change(event)

        assert "sub_1" == change.subscription_id
        assert "cus_1" == change.customer_id
        assert "active" == change.status
        assert ORG_ID == change.org_id
        assert frozenset({"price_pro"}) == change.price_ids

    def test_deleted_is_canceled(self):
        event = stripe_event(
            "customer.subscription.deleted",
            {"id": "sub_1", "customer": "cus_1", "status": "active"},
        )

        assert "canceled" == webhooks.subscription_change(event).status

    def test_paid_checkout_is_active(self):
        event = stripe_event(
            "checkout.session.completed",
            {
                "id": "cs_1",
                "mode": "subscription",
                "payment_status": "paid",
                "customer": "cus_1",
                "subscription": "sub_1",
                "client_reference_id": ORG_ID,
            },
        )

        change = webhooks.subscription_change(event)

        assert "active" == change.status
        assert "sub_1" == change.subscription_id
        assert ORG_ID == change.org_id

    def test_unpaid_checkout_changes_nothing(self):
        event = stripe_event(
            "checkout.session.completed",
            {
                "mode": "subscription",
                "payment_status": "unpaid",
                "customer": "cus_1",
                "subscription": "sub_1",
            },
        )

        assert webhooks.subscription_change(event) is None

    def test_invalid_org_id_ignored(self):
        event = stripe_event(
            "customer.subscription.created",
            {
                "id": "sub_1",
                "customer": "cus_1",
                "status": "active",
                "metadata": {"org_id": "not-a-uuid"},
            },
        )

        assert webhooks.subscription_change(event).org_id is None

    def test_other_event_types_ignored(self):
        event = stripe_event("customer.created", {"id": "cus_1"})

        assert webhooks.subscription_change(event) is None
        assert webhooks.invoice_result(event) is None


class TestInvoiceResult:
    def test_paid_with_parent_subscription(self):
        event = stripe_event(
            "invoice.paid",
            {
                "id": "in_1",
                "customer": "cus_1",
                "parent": {"subscription_details": {"subscription": "sub_1"}},
                "amount_due": 4900,
                "currency": "usd",
            },
        )

        result = webhooks.invoice_result(event)

        assert "paid" == result.status
        assert "sub_1" == result.subscription_id
        assert 4900 == result.amount_due
        assert "usd" == result.currency

    def test_payment_failed_with_legacy_field(self):
        event = stripe_event(
            "invoice.payment_failed",
            {"id": "in_1", "customer": "cus_1", "subscription": "sub_2"},
        )

        result = webhooks.invoice_result(event)

        assert "payment_failed" == result.status
        assert "sub_2" == result.subscription_id


T0 = datetime.datetime(2026, 9, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(seconds=1)


class TestSupersedes:
    @pytest.mark.parametrize(
        ("new_status", "new_time", "old_status", "old_time", "expected"),
        [
            ("active", T1, "incomplete", T0, True),
            ("incomplete", T0, "active", T1, False),
            ("active", T0, "canceled", T1, False),
            ("active", T1, "canceled", T0, False),
            ("past_due", T1, "active", T0, True),
            ("active", T0, "past_due", T1, False),
            ("canceled", T0, "active", T0, True),
            ("incomplete", T0, "active", T0, False),
            ("active", T0, "incomplete", T0, True),
            ("incomplete", T0, "incomplete", T0, True),
            ("past_due", T0, "active", T0, True),
        ],
    )
    def test_order(self, new_status, new_time, old_status, old_time, expected):
        assert expected == webhooks.supersedes(
            new_status, new_time, old_status, old_time
        )


class TestMalformedEvents:
    @pytest.mark.parametrize(
        "changes",
        [
            {"id": "evt_\u0000x"},
            {"id": ""},
            {"type": 7},
            {"created": 10**20},
            {"created": -1},
            {"created": True},
        ],
    )
    def test_rejected_as_invalid(self, changes):
        """An event no real delivery carries is a 400, never a 5xx."""
        with pytest.raises(InvalidWebhook):
            webhooks.parse_event(event_body(**changes))
