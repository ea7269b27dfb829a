"""Verify Stripe webhook deliveries and read the events billing acts on.

Stripe signs `<timestamp>.<raw body>` with the endpoint's secret (HMAC
SHA-256) and sends `t=<timestamp>,v1=<signature>` in `Stripe-Signature`.
The SDK checks the signature and rejects old timestamps. This module also
rejects timestamps in the future, so a signed body cannot be held back and
replayed later either.
"""

import datetime
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import stripe

SIGNATURE_HEADER = "stripe-signature"

# Subscription statuses that grant the Pro plan. Stripe keeps `past_due`
# subscriptions running while it retries the payment.
PRO_STATUSES = frozenset({"active", "trialing", "past_due"})
# Statuses Stripe never moves a subscription out of.
FINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})
# The status of a new subscription before its first payment.
INITIAL_STATUS = "incomplete"

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    }
)
INVOICE_EVENTS = {
    "invoice.paid": "paid",
    "invoice.payment_failed": "payment_failed",
}
CHECKOUT_COMPLETED = "checkout.session.completed"


class InvalidWebhook(ValueError):
    """A delivery that is not a correctly signed, recent Stripe event."""


@dataclass(frozen=True)
class StripeEvent:
    event_id: str
    event_type: str
    # Stripe's `created`: when the event happened, to the second.
    time: datetime.datetime
    # `data.object`: the object as it was when the event happened.
    data: dict[str, Any]


@dataclass(frozen=True)
class SubscriptionChange:
    """A subscription's status as of one event."""

    subscription_id: str
    customer_id: str
    status: str
    time: datetime.datetime
    # Organization named in the object's metadata or the checkout's client
    # reference; None when only the customer can tell.
    org_id: str | None
    price_ids: frozenset[str]


@dataclass(frozen=True)
class InvoiceResult:
    invoice_id: str
    customer_id: str
    subscription_id: str | None
    # "paid" or "payment_failed".
    status: str
    time: datetime.datetime
    amount_due: int
    currency: str


def _signature_timestamp(header: str) -> int:
    """Return the `t=` value of a Stripe-Signature header, as the SDK does."""
    for part in header.split(","):
        name, _, value = part.partition("=")
        if name.strip() == "t":
            return int(value)
    raise ValueError("no t= element")


def verify_event(
    payload: bytes,
    header: str,
    secret: str,
    tolerance: int,
    now: float | None = None,
) -> StripeEvent:
    """Check a delivery's signature and age, then parse its event.

    Raise `InvalidWebhook` when the header is missing or malformed, the
    signature does not match these exact bytes, the timestamp is more than
    `tolerance` seconds old or ahead, or the body is not a Stripe event.
    """
    if not header:
        raise InvalidWebhook(
            "missing Stripe-Signature header: only Stripe may call this "
            "endpoint"
        )
    try:
        stripe.WebhookSignature.verify_header(
            payload, header, secret, tolerance
        )
    except stripe.SignatureVerificationError as error:
        raise InvalidWebhook(
            f"invalid Stripe signature: {error.user_message or error}; "
            "check that STRIPE_WEBHOOK_SECRET matches the endpoint's secret"
        ) from None
    except UnicodeDecodeError:
        raise InvalidWebhook("invalid body: not UTF-8 text") from None
    timestamp = _signature_timestamp(header)
    current = time.time() if now is None else now
    if timestamp > current + tolerance:
        raise InvalidWebhook(
            f"invalid Stripe signature: timestamp {timestamp} is more than "
            f"{tolerance} s in the future; check the sender's clock"
        )

    return parse_event(payload)


def parse_event(payload: bytes) -> StripeEvent:
    try:
        document = json.loads(payload)
    except ValueError:
        raise InvalidWebhook("invalid body: not JSON") from None
    if not isinstance(document, dict) or document.get("object") != "event":
        raise InvalidWebhook("invalid body: not a Stripe event object")
    event_id = document.get("id")
    event_type = document.get("type")
    created = document.get("created")
    data = document.get("data")
    if (
        not _is_token(event_id)
        or not _is_token(event_type)
        or not isinstance(created, int)
        or isinstance(created, bool)
        or not 0 <= created <= _LATEST_TIMESTAMP
        or not isinstance(data, dict)
        or not isinstance(data.get("object"), dict)
    ):
        raise InvalidWebhook(
            "invalid body: a Stripe event needs id, type, created and "
            "data.object"
        )

    return StripeEvent(
        event_id=event_id[:255],
        event_type=event_type[:255],
        time=datetime.datetime.fromtimestamp(created, datetime.UTC),
        data=data["object"],
    )


# The last second of year 9999: later `created` values are not times.
_LATEST_TIMESTAMP = 253_402_300_799
# Stripe ids and types: printable ASCII, which a database column can hold.
_TOKEN = re.compile(r"[\x21-\x7e]{1,255}")


def _is_token(value: Any) -> bool:
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def _text(value: Any) -> str:
    """Return a Stripe id field, which is a string or an expanded object.

    Anything but a printable id, a NUL character for one, reads as absent.
    """
    if isinstance(value, dict):
        value = value.get("id")

    return value if _is_token(value) else ""


def _org_id(*candidates: Any) -> str | None:
    for candidate in candidates:
        if not isinstance(candidate, str):
            continue
        try:
            return str(uuid.UUID(candidate))
        except ValueError:
            continue

    return None


def _metadata_org_id(data: dict[str, Any]) -> Any:
    metadata = data.get("metadata")

    return metadata.get("org_id") if isinstance(metadata, dict) else None


def _price_ids(subscription: dict[str, Any]) -> frozenset[str]:
    items = subscription.get("items")
    entries = items.get("data") if isinstance(items, dict) else None
    prices = set()
    for item in entries if isinstance(entries, list) else ():
        if isinstance(item, dict):
            price = _text(item.get("price"))
            if price:
                prices.add(price)

    return frozenset(prices)


def subscription_change(event: StripeEvent) -> SubscriptionChange | None:
    """Read the subscription status an event reports, if any.

    A completed, paid checkout reports its new subscription as `active`;
    the subscription events carry the subscription itself.
    """
    data = event.data
    if event.event_type == CHECKOUT_COMPLETED:
        if data.get("mode") != "subscription" or data.get(
            "payment_status"
        ) not in ("paid", "no_payment_required"):
            return None
        subscription_id = _text(data.get("subscription"))
        customer_id = _text(data.get("customer"))
        if not subscription_id or not customer_id:
            return None

        return SubscriptionChange(
            subscription_id=subscription_id,
            customer_id=customer_id,
            status="active",
            time=event.time,
            org_id=_org_id(
                data.get("client_reference_id"), _metadata_org_id(data)
            ),
            # The checkout's line items are not in the event; the
            # subscription events that follow carry them.
            price_ids=frozenset(),
        )
    if event.event_type not in SUBSCRIPTION_EVENTS:
        return None
    subscription_id = _text(data.get("id"))
    customer_id = _text(data.get("customer"))
    status = data.get("status")
    if not subscription_id or not customer_id or not isinstance(status, str):
        return None
    if event.event_type == "customer.subscription.deleted":
        status = "canceled"

    return SubscriptionChange(
        subscription_id=subscription_id,
        customer_id=customer_id,
        status=status,
        time=event.time,
        org_id=_org_id(_metadata_org_id(data)),
        price_ids=_price_ids(data),
    )


def invoice_result(event: StripeEvent) -> InvoiceResult | None:
    status = INVOICE_EVENTS.get(event.event_type)
    if status is None:
        return None
    data = event.data
    invoice_id = _text(data.get("id"))
    customer_id = _text(data.get("customer"))
    if not invoice_id or not customer_id:
        return None
    # Since API version 2025-03-31 the subscription sits under
    # `parent.subscription_details`; older versions had `subscription`.
    parent = data.get("parent")
    details = (
        parent.get("subscription_details")
        if isinstance(parent, dict)
        else None
    )
    subscription_id = _text(
        details.get("subscription") if isinstance(details, dict) else None
    ) or _text(data.get("subscription"))
    amount_due = data.get("amount_due")
    currency = data.get("currency")

    return InvoiceResult(
        invoice_id=invoice_id,
        customer_id=customer_id,
        subscription_id=subscription_id or None,
        status=status,
        time=event.time,
        amount_due=amount_due if isinstance(amount_due, int) else 0,
        currency=currency if isinstance(currency, str) else "",
    )


def supersedes(
    new_status: str,
    new_time: datetime.datetime,
    old_status: str,
    old_time: datetime.datetime,
) -> bool:
    """Tell whether a reported status replaces the stored one.

    Stripe delivers events at least once and in any order, so a status
    replaces another only when its event is newer. Event times have
    one-second resolution, so for events of the same second a final status
    wins and `incomplete`, the first status of every subscription, never
    replaces another. Nothing replaces a final status.
    """
    if old_status in FINAL_STATUSES:
        return False
    if new_time != old_time:
        return new_time > old_time
    if new_status in FINAL_STATUSES:
        return True

    return new_status != INITIAL_STATUS or old_status == INITIAL_STATUS
