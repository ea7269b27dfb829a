"""Stripe events as Stripe sends them, signed with the SDK's helper."""

import json
import time
import uuid

import stripe

WEBHOOK_PATH = "/v1/billing/stripe/webhook"


def event_body(
    event_type: str,
    data: dict,
    created: int | None = None,
    event_id: str | None = None,
) -> bytes:
    """Return an event's body, indented and with non-ASCII text as UTF-8.

    Stripe's own bodies are indented too; any re-encoding on the way to
    the service would change these bytes and so break the signature.
    """
    event = {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "type": event_type,
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "data": {"object": data},
    }

    return json.dumps(event, indent=2, ensure_ascii=False).encode()


def subscription(
    subscription_id: str,
    customer_id: str,
    status: str,
    org_id: str | None = None,
    price_id: str = "price_pro_monthly",
) -> dict:
    return {
        "id": subscription_id,
        "object": "subscription",
        "customer": customer_id,
        "status": status,
        "description": "Abonnement Pro für Universitätsspital",
        "metadata": {"org_id": org_id} if org_id else {},
        "items": {
            "object": "list",
            "data": [
                {"object": "subscription_item", "price": {"id": price_id}}
            ],
        },
    }


def checkout_completed(
    session_id: str, customer_id: str, subscription_id: str, org_id: str
) -> dict:
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": "subscription",
        "status": "complete",
        "payment_status": "paid",
        "customer": customer_id,
        "subscription": subscription_id,
        "client_reference_id": org_id,
        "metadata": {"org_id": org_id},
    }


def signature(body: bytes, secret: str, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp
    )


def signed_headers(
    body: bytes, secret: str, timestamp: int | None = None
) -> dict[str, str]:
    return {
        "stripe-signature": signature(body, secret, timestamp),
        "content-type": "application/json; charset=utf-8",
    }
