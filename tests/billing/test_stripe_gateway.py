"""Outbound Stripe calls against a local Stripe-compatible server."""

import asyncio
import datetime

import grpc
import pytest

from services.billing.config import STRIPE_API_VERSION
from services.billing.stripe_gateway import StripeFailure, StripeGateway
from services.launcher.processes import free_port
from tests.billing.conftest import stripe_config

ORG_ID = "0b6f2c1e-5d7a-4c39-9a8e-3f1d2b4c5e6f"


def run(coroutine):
    return asyncio.run(coroutine)


def gateway_for(fake_stripe, **changes) -> StripeGateway:
    return StripeGateway(stripe_config(fake_stripe.base_url, **changes))


class TestPinnedVersion:
    def test_matches_the_sdk(self):
        """The pinned version is the one the installed SDK models."""
        from stripe._api_version import _ApiVersion

        assert _ApiVersion.CURRENT == STRIPE_API_VERSION


class TestCustomer:
    def test_carries_only_org_id_and_name(self, fake_stripe):
        gateway = gateway_for(fake_stripe)

        customer_id = run(gateway.create_customer(ORG_ID, "General Hospital"))

        [request] = fake_stripe.requests_to("/v1/customers")
        assert [] == fake_stripe.state.violations
        assert customer_id.startswith("cus_")
        assert {
            "name": "General Hospital",
            "metadata[org_id]": ORG_ID,
        } == request.parameters
        assert f"arxio-customer-{ORG_ID}" == request.headers["idempotency-key"]
        assert STRIPE_API_VERSION == request.headers["stripe-version"]

    def test_repeat_returns_same_customer(self, fake_stripe):
        gateway = gateway_for(fake_stripe)

        first = run(gateway.create_customer(ORG_ID, "General Hospital"))
        second = run(gateway.create_customer(ORG_ID, "General Hospital"))

        assert first == second
        assert fake_stripe.requests_to("/v1/customers")[1].replayed


class TestCheckout:
    def test_parameters(self, fake_stripe):
        gateway = gateway_for(fake_stripe)

        link = run(
            gateway.create_checkout_session(ORG_ID, "cus_test9", "req-1")
        )

        [request] = fake_stripe.requests_to("/v1/checkout/sessions")
        assert [] == fake_stripe.state.violations
        assert link.url.startswith("https://checkout.stripe.test/")
        assert link.expire_time > datetime.datetime.now(datetime.UTC)
        expected = {
            "mode": "subscription",
            "customer": "cus_test9",
            "client_reference_id": ORG_ID,
            "line_items[0][price]": "price_pro_monthly",
            "line_items[0][quantity]": "1",
            "line_items[1][price]": "price_pro_requests",
            "success_url": "https://portal.example.test/billing/done",
            "cancel_url": "https://portal.example.test/billing",
            "metadata[org_id]": ORG_ID,
            "subscription_data[metadata][org_id]": ORG_ID,
        }
        assert expected == request.parameters
        assert "arxio-checkout-req-1" == request.headers["idempotency-key"]

    def test_without_metered_price(self, fake_stripe):
        gateway = gateway_for(fake_stripe, metered_price_id=None)

        run(gateway.create_checkout_session(ORG_ID, "cus_test9", "req-2"))

        [request] = fake_stripe.requests_to("/v1/checkout/sessions")
        assert "line_items[1][price]" not in request.parameters


class TestPortal:
    def test_parameters(self, fake_stripe):
        gateway = gateway_for(fake_stripe)

        url = run(gateway.create_portal_session("cus_test9", "req-3"))

        [request] = fake_stripe.requests_to("/v1/billing_portal/sessions")
        assert url.startswith("https://billing.stripe.test/")
        assert {
            "customer": "cus_test9",
            "return_url": "https://portal.example.test/",
        } == request.parameters
        assert "arxio-portal-req-3" == request.headers["idempotency-key"]


class TestMeterEvent:
    def test_parameters(self, fake_stripe):
        gateway = gateway_for(fake_stripe)
        day_end = datetime.datetime(
            2026, 9, 1, 23, 59, 59, tzinfo=datetime.UTC
        )

        run(gateway.send_meter_event("cus_test9", 42, "usage-1", day_end))

        [request] = fake_stripe.requests_to("/v1/billing/meter_events")
        assert {
            "event_name": "arxio_api_requests",
            "identifier": "usage-1",
            "timestamp": str(int(day_end.timestamp())),
            "payload[stripe_customer_id]": "cus_test9",
            "payload[value]": "42",
        } == request.parameters
        assert "usage-1" == request.headers["idempotency-key"]


class TestFailures:
    def test_outage_retried_then_unavailable(self, fake_stripe):
        """Two retries, the same key each time, then UNAVAILABLE."""
        gateway = gateway_for(fake_stripe, max_network_retries=2)
        fake_stripe.fail_next(10, status=500)

        with pytest.raises(StripeFailure) as raised:
            run(gateway.create_customer(ORG_ID, "General Hospital"))

        requests = fake_stripe.requests_to("/v1/customers")
        assert grpc.StatusCode.UNAVAILABLE == raised.value.code
        assert 3 == len(requests)
        assert {f"arxio-customer-{ORG_ID}"} == {
            request.headers["idempotency-key"] for request in requests
        }

    def test_retry_recovers(self, fake_stripe):
        gateway = gateway_for(fake_stripe, max_network_retries=2)
        fake_stripe.fail_next(1, status=503)

        customer_id = run(gateway.create_customer(ORG_ID, "General Hospital"))

        assert customer_id.startswith("cus_")
        assert 2 == len(fake_stripe.requests_to("/v1/customers"))

    def test_unreachable_is_unavailable(self):
        config = stripe_config(
            f"http://127.0.0.1:{free_port()}", max_network_retries=1
        )

        with pytest.raises(StripeFailure) as raised:
            run(StripeGateway(config).create_customer(ORG_ID, "General"))

        assert grpc.StatusCode.UNAVAILABLE == raised.value.code
        assert "unreachable" in raised.value.message

    def test_rate_limit_is_unavailable(self, fake_stripe):
        gateway = gateway_for(fake_stripe, max_network_retries=0)
        fake_stripe.fail_next(1, status=429, error_type="rate_limit_error")

        with pytest.raises(StripeFailure) as raised:
            run(gateway.create_customer(ORG_ID, "General Hospital"))

        assert grpc.StatusCode.UNAVAILABLE == raised.value.code

    def test_rejected_key_is_internal(self, fake_stripe):
        gateway = gateway_for(fake_stripe, api_key="sk_test_wrong")

        with pytest.raises(StripeFailure) as raised:
            run(gateway.create_customer(ORG_ID, "General Hospital"))

        assert grpc.StatusCode.INTERNAL == raised.value.code
        assert "STRIPE_API_KEY" in raised.value.message

    def test_invalid_request_is_failed_precondition(self, fake_stripe):
        gateway = gateway_for(fake_stripe, max_network_retries=0)
        fake_stripe.fail_next(
            1, status=400, error_type="invalid_request_error"
        )

        with pytest.raises(StripeFailure) as raised:
            run(gateway.create_portal_session("cus_missing", "req-4"))

        assert grpc.StatusCode.FAILED_PRECONDITION == raised.value.code

    def test_reused_key_other_parameters_aborted(self, fake_stripe):
        gateway = gateway_for(fake_stripe)
        run(gateway.create_customer(ORG_ID, "General Hospital"))

        with pytest.raises(StripeFailure) as raised:
            run(gateway.create_customer(ORG_ID, "Renamed Hospital"))

        assert grpc.StatusCode.ABORTED == raised.value.code
