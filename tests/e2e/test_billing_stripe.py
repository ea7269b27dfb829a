"""Billing with Stripe configured, against a local Stripe-compatible server:
checkout, the customer portal, a Stripe outage, and the usage job."""

import datetime
import time
import uuid

import psycopg
import pytest

from services.billing.usage_reports import meter_identifier
from tests.billing.fake_stripe import API_KEY, FakeStripe
from tests.billing.stripe_events import (
    WEBHOOK_PATH,
    checkout_completed,
    event_body,
    signed_headers,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
METER_PATH = "/v1/billing/meter_events"
WAIT = 30.0


@pytest.fixture(scope="module")
def fake_stripe():
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stripe_stack(fake_stripe):
    """A suite of its own whose billing service calls the local Stripe."""
    # No model runtime: these tests ask for no model review.
    with own_stack(
        billing_environment={
            "STRIPE_API_KEY": API_KEY,
            "STRIPE_API_BASE": fake_stripe.base_url,
            "STRIPE_PRO_PRICE_ID": "price_pro_monthly",
            "STRIPE_METERED_PRICE_ID": "price_pro_requests",
            "STRIPE_MAX_NETWORK_RETRIES": "1",
            "ARXIO_BILLING_USAGE_REPORT_SECONDS": "0.5",
            "ARXIO_BILLING_USAGE_SETTLE_SECONDS": "0",
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def stripe_edge(stripe_stack) -> EdgeClient:
    return EdgeClient(
        stripe_stack.edge_port, stripe_stack.certs_dir / "ca.crt"
    )


def wait_for(condition, description: str):
    deadline = time.monotonic() + WAIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {WAIT}s waiting for {description}"
            )
        time.sleep(0.25)


def checkout(edge, org):
    return edge.request(
        "POST", "/v1/billing/checkout", {}, {"x-api-key": org.api_key}
    )


def org_requests(fake_stripe, path: str, org_id: str) -> list:
    return [
        request
        for request in fake_stripe.requests_to(path)
        if org_id in request.parameters.values()
    ]


def complete_checkout(stack, edge, org, created: int | None = None) -> str:
    """Deliver the signed `checkout.session.completed` Stripe would send."""
    with psycopg.connect(stack.admin_database_url) as connection:
        [customer_id] = connection.execute(
            "SELECT stripe_customer_id FROM billing.customers"
            " WHERE org_id = %s",
            (org.org_id,),
        ).fetchone()
    data = checkout_completed(
        f"cs_{uuid.uuid4().hex}",
        customer_id,
        f"sub_{uuid.uuid4().hex}",
        org.org_id,
    )
    body = event_body("checkout.session.completed", data, created)
    response = edge.request(
        "POST", WEBHOOK_PATH, body, signed_headers(body, stack.webhook_secret)
    )
    assert 200 == response.status, response.body

    return customer_id


def rate_limit(edge, org) -> str:
    response = edge.request(
        "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": org.api_key}
    )
    assert 200 == response.status, response.body

    return response.headers["x-ratelimit-limit"]


class TestCheckout:
    def test_returns_stripe_url(self, stripe_stack, stripe_edge, fake_stripe):
        org = Organization(stripe_stack)

        response = checkout(stripe_edge, org)

        assert 200 == response.status, response.body
        assert response.json()["url"].startswith(
            "https://checkout.stripe.test/"
        )
        assert [] == fake_stripe.state.violations
        [customer] = org_requests(fake_stripe, "/v1/customers", org.org_id)
        assert {"name", "metadata[org_id]"} == set(customer.parameters)
        [session] = org_requests(
            fake_stripe, "/v1/checkout/sessions", org.org_id
        )
        assert (
            "price_pro_monthly" == session.parameters["line_items[0][price]"]
        )
        assert session.headers["idempotency-key"].startswith("arxio-checkout-")

    def test_customer_created_once(
        self, stripe_stack, stripe_edge, fake_stripe
    ):
        org = Organization(stripe_stack)

        first = checkout(stripe_edge, org)
        second = checkout(stripe_edge, org)

        assert 200 == first.status
        assert 200 == second.status
        assert 1 == len(org_requests(fake_stripe, "/v1/customers", org.org_id))
        sessions = org_requests(
            fake_stripe, "/v1/checkout/sessions", org.org_id
        )
        assert 2 == len({r.headers["idempotency-key"] for r in sessions})

    def test_webhook_upgrades_to_pro(
        self, stripe_stack, stripe_edge, fake_stripe
    ):
        org = Organization(stripe_stack)
        assert 200 == checkout(stripe_edge, org).status
        assert "100" == rate_limit(stripe_edge, org)

        complete_checkout(stripe_stack, stripe_edge, org)

        assert "10000" == rate_limit(stripe_edge, org)
        again = checkout(stripe_edge, org)
        assert 400 == again.status
        assert "portal" in again.json()["message"]

    def test_portal_returns_stripe_url(
        self, stripe_stack, stripe_edge, fake_stripe
    ):
        org = Organization(stripe_stack)

        response = stripe_edge.request(
            "POST", "/v1/billing/portal", {}, {"x-api-key": org.api_key}
        )

        assert 200 == response.status, response.body
        assert response.json()["url"].startswith(
            "https://billing.stripe.test/"
        )

    def test_stripe_outage_is_503(
        self, stripe_stack, stripe_edge, fake_stripe
    ):
        org = Organization(stripe_stack)
        fake_stripe.fail_next(2, status=500)

        response = checkout(stripe_edge, org)

        assert 503 == response.status
        assert 14 == response.json()["code"]
        assert "retry later" in response.json()["message"]


class TestUsageReports:
    def test_each_day_reported_once(
        self, stripe_stack, stripe_edge, fake_stripe
    ):
        """Yesterday's count reaches Stripe's meter once, over many runs."""
        org = Organization(stripe_stack)
        assert 200 == checkout(stripe_edge, org).status
        two_days_ago = int(time.time()) - 2 * 86_400
        customer_id = complete_checkout(
            stripe_stack, stripe_edge, org, two_days_ago
        )
        yesterday = datetime.datetime.now(
            datetime.UTC
        ).date() - datetime.timedelta(days=1)
        with psycopg.connect(stripe_stack.admin_database_url) as connection:
            connection.execute(
                "INSERT INTO auth.daily_usage (org_id, day, request_count)"
                " VALUES (%s, %s, 37)",
                (org.org_id, yesterday),
            )
        identifier = meter_identifier(org.org_id, yesterday)

        def sent():
            return [
                request
                for request in fake_stripe.requests_to(METER_PATH)
                if request.parameters["identifier"] == identifier
            ]

        [event] = wait_for(sent, "the meter event")
        # Several more runs of the job, 0.5 s apart.
        time.sleep(3)

        assert 1 == len(sent())
        assert customer_id == event.parameters["payload[stripe_customer_id]"]
        assert "37" == event.parameters["payload[value]"]
        assert [] == fake_stripe.state.violations
        with psycopg.connect(stripe_stack.admin_database_url) as connection:
            rows = connection.execute(
                "SELECT day, request_count, identifier"
                " FROM billing.usage_reports WHERE org_id = %s",
                (org.org_id,),
            ).fetchall()
        assert [(yesterday, 37, identifier)] == rows
