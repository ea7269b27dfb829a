"""Billing through the edge with no Stripe key: plans, usage, and Stripe's
webhook verified with the locally generated secret."""

import time
import uuid

import grpc
import psycopg
import pytest
from arxio.billing.v1 import billing_pb2, billing_pb2_grpc
from google.api import httpbody_pb2

from services.launcher.envoy_config import WEBHOOK_MAX_REQUEST_BYTES
from tests.billing.stripe_events import (
    WEBHOOK_PATH,
    event_body,
    signed_headers,
    subscription,
)
from tests.suite import run_cli

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
AUDIT_WAIT = 20.0


def new_ids() -> tuple[str, str]:
    return f"sub_{uuid.uuid4().hex}", f"cus_{uuid.uuid4().hex}"


def post_event(edge, stack, body: bytes, timestamp: int | None = None):
    return edge.request(
        "POST",
        WEBHOOK_PATH,
        body,
        signed_headers(body, stack.webhook_secret, timestamp),
    )


def rate_limit(edge, api_key: str) -> str:
    response = edge.request(
        "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": api_key}
    )
    assert 200 == response.status, response.body

    return response.headers["x-ratelimit-limit"]


def subscription_event(event_type, ids, status, org_id, created=None):
    subscription_id, customer_id = ids

    return event_body(
        event_type,
        subscription(subscription_id, customer_id, status, org_id),
        created,
    )


class TestWebhookSignature:
    def test_valid_event_accepted(self, stack, edge, new_org):
        org = new_org()
        body = subscription_event(
            "customer.subscription.created", new_ids(), "active", org.org_id
        )

        response = post_event(edge, stack, body)

        assert 200 == response.status, response.body
        assert {"duplicate": False} == response.json()

    def test_changed_byte_gets_400(self, stack, edge, new_org):
        org = new_org()
        body = subscription_event(
            "customer.subscription.created", new_ids(), "active", org.org_id
        )
        headers = signed_headers(body, stack.webhook_secret)
        changed = body.replace(b"active", b"activf")

        response = edge.request("POST", WEBHOOK_PATH, changed, headers)

        assert 400 == response.status
        assert 3 == response.json()["code"]
        assert "signature" in response.json()["message"]
        assert "10000" != rate_limit(edge, org.api_key)

    def test_missing_header_gets_400(self, edge):
        body = event_body("customer.created", {"id": "cus_1"})

        response = edge.request(
            "POST",
            WEBHOOK_PATH,
            body,
            {"content-type": "application/json"},
        )

        assert 400 == response.status
        assert "Stripe-Signature" in response.json()["message"]

    def test_old_timestamp_gets_400(self, stack, edge):
        body = event_body("customer.created", {"id": "cus_1"})

        response = post_event(edge, stack, body, int(time.time()) - 600)

        assert 400 == response.status
        assert "tolerance" in response.json()["message"]

    def test_future_timestamp_gets_400(self, stack, edge):
        body = event_body("customer.created", {"id": "cus_1"})

        response = post_event(edge, stack, body, int(time.time()) + 600)

        assert 400 == response.status
        assert "future" in response.json()["message"]

    def test_no_api_key_needed_or_counted(self, stack, edge, new_org):
        """The route skips the auth decision: no key, no quota."""
        org = new_org()
        body = subscription_event(
            "customer.subscription.created",
            new_ids(),
            "incomplete",
            org.org_id,
        )

        response = post_event(edge, stack, body)
        usage = edge.request(
            "GET", "/v1/billing/usage", headers={"x-api-key": org.api_key}
        )

        assert 200 == response.status
        assert "x-ratelimit-limit" not in response.headers
        assert 200 == usage.status
        # The usage request itself is the only one counted.
        assert "1" == usage.json()["totalRequests"]

    def test_grpc_call_needs_a_key(self, edge):
        """Only the REST route skips the auth decision."""
        request = billing_pb2.StripeWebhookRequest(
            body=httpbody_pb2.HttpBody(data=b"{}")
        )
        with edge.channel() as channel:
            stub = billing_pb2_grpc.BillingServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.HandleStripeWebhook(request, timeout=30)

        assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()


class TestWebhookBody:
    def test_larger_than_api_limit_accepted(self, stack, edge, new_org):
        """A 200 KB event passes: the route has its own body limit."""
        org = new_org()
        data = subscription(*new_ids(), "incomplete", org.org_id)
        data["description"] = "Jahresabonnement " + "ü" * 100_000
        body = event_body("customer.subscription.created", data)

        response = post_event(edge, stack, body)

        assert len(body) > 64 * 1024
        assert 200 == response.status, response.body

    def test_over_its_limit_gets_413(self, stack, edge):
        data = {"id": "cus_1", "description": "x" * WEBHOOK_MAX_REQUEST_BYTES}
        body = event_body("customer.updated", data)

        response = post_event(edge, stack, body)

        assert 413 == response.status

    def test_delivery_is_audited(self, stack, edge):
        body = event_body("customer.created", {"id": "cus_1"})
        responses = [
            post_event(edge, stack, body),
            edge.request(
                "POST",
                WEBHOOK_PATH,
                body,
                {"content-type": "application/json"},
            ),
        ]
        ids = [response.headers["x-request-id"] for response in responses]

        rows = audit_rows(stack, ids)

        assert [
            ("billing.handle_stripe_webhook", 200, None),
            ("billing.handle_stripe_webhook", 400, None),
        ] == [rows[request_id] for request_id in ids]


def audit_rows(stack, request_ids: list[str]) -> dict[str, tuple]:
    deadline = time.monotonic() + AUDIT_WAIT
    with psycopg.connect(stack.admin_database_url) as connection:
        while True:
            rows = connection.execute(
                "SELECT request_id, action, status_code, org_id::text"
                " FROM audit.events WHERE request_id = ANY(%s)",
                (request_ids,),
            ).fetchall()
            if len(rows) == len(request_ids):
                return {row[0]: row[1:] for row in rows}
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit rows for {request_ids}")
            time.sleep(0.25)


class TestPlanChanges:
    def test_plan_reaches_next_request(self, stack, edge, new_org):
        """Active makes Pro, canceled makes Free, each on the next call."""
        org = new_org()
        ids = new_ids()
        assert "100" == rate_limit(edge, org.api_key)

        created = subscription_event(
            "customer.subscription.created", ids, "active", org.org_id
        )
        assert 200 == post_event(edge, stack, created).status
        pro_limit = rate_limit(edge, org.api_key)
        deleted = subscription_event(
            "customer.subscription.deleted",
            ids,
            "canceled",
            org.org_id,
            int(time.time()) + 1,
        )
        assert 200 == post_event(edge, stack, deleted).status

        assert "10000" == pro_limit
        assert "100" == rate_limit(edge, org.api_key)

    def test_same_event_twice(self, stack, edge, new_org):
        org = new_org()
        body = subscription_event(
            "customer.subscription.created", new_ids(), "active", org.org_id
        )

        first = post_event(edge, stack, body)
        second = post_event(edge, stack, body)

        assert {"duplicate": False} == first.json()
        assert {"duplicate": True} == second.json()
        assert "10000" == rate_limit(edge, org.api_key)

    def test_out_of_order_keeps_newer_state(self, stack, edge, new_org):
        """`deleted` arrives before the older `created: active`."""
        org = new_org()
        ids = new_ids()
        now = int(time.time())
        deleted = subscription_event(
            "customer.subscription.deleted", ids, "canceled", org.org_id, now
        )
        created = subscription_event(
            "customer.subscription.created",
            ids,
            "active",
            org.org_id,
            now - 60,
        )

        assert 200 == post_event(edge, stack, deleted).status
        assert 200 == post_event(edge, stack, created).status

        assert "100" == rate_limit(edge, org.api_key)
        subscription_reply = edge.request(
            "GET",
            "/v1/billing/subscription",
            headers={"x-api-key": org.api_key},
        ).json()
        assert "FREE" == subscription_reply["plan"]
        assert "canceled" == subscription_reply["stripeStatus"]

    def test_enterprise_never_changed(self, stack, edge, new_org):
        org = new_org("enterprise")
        ids = new_ids()
        body = subscription_event(
            "customer.subscription.created", ids, "active", org.org_id
        )

        assert 200 == post_event(edge, stack, body).status

        organization = run_cli(stack, "orgs", "get", "--org", org.org_id)
        assert "ENTERPRISE" == organization["plan"]


class TestWithoutStripe:
    def test_checkout_failed_precondition(self, edge, new_org):
        org = new_org()

        response = edge.request(
            "POST", "/v1/billing/checkout", {}, {"x-api-key": org.api_key}
        )

        assert 400 == response.status
        assert 9 == response.json()["code"]
        assert "STRIPE_API_KEY" in response.json()["message"]

    def test_portal_failed_precondition(self, edge, new_org):
        org = new_org()

        response = edge.request(
            "POST", "/v1/billing/portal", {}, {"x-api-key": org.api_key}
        )

        assert 400 == response.status
        assert 9 == response.json()["code"]

    def test_plans_and_usage_still_served(self, edge, new_org):
        org = new_org()
        key = {"x-api-key": org.api_key}
        rate_limit(edge, org.api_key)

        subscription_reply = edge.request(
            "GET", "/v1/billing/subscription", headers=key
        )
        usage = edge.request("GET", "/v1/billing/usage", headers=key)

        assert 200 == subscription_reply.status
        assert "FREE" == subscription_reply.json()["plan"]
        assert "" == subscription_reply.json()["stripeStatus"]
        assert 200 == usage.status
        # The review, the subscription read and the usage read itself.
        assert "3" == usage.json()["totalRequests"]

    def test_checkout_needs_billing_manage(self, stack, edge, new_org):
        org = new_org()
        key = run_cli(
            stack,
            "keys",
            "create",
            "--org",
            org.org_id,
            "--scope",
            "billing_read",
        )

        response = edge.request(
            "POST", "/v1/billing/checkout", {}, {"x-api-key": key["apiKey"]}
        )

        assert 403 == response.status
        assert "BILLING_MANAGE" in response.json()["message"]
