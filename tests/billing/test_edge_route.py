"""The edge's route for Stripe's webhook, generated from the protos."""

from services.common import methods
from services.launcher.envoy_config import WEBHOOK_MAX_REQUEST_BYTES, routes

WEBHOOK_ROUTE = "billing.handle_stripe_webhook"


def routes_by_name() -> dict[str, dict]:
    return {route["name"]: route for route in routes()}


class TestWebhookRoute:
    def test_skips_auth_decision(self):
        route = routes_by_name()[WEBHOOK_ROUTE]
        per_filter = route["typed_per_filter_config"]

        assert per_filter["envoy.filters.http.ext_authz"]["disabled"]

    def test_has_its_own_body_limit(self):
        route = routes_by_name()[WEBHOOK_ROUTE]
        buffer = route["typed_per_filter_config"]["envoy.filters.http.buffer"]

        assert (
            WEBHOOK_MAX_REQUEST_BYTES == buffer["buffer"]["max_request_bytes"]
        )

    def test_drops_identity_headers(self):
        removed = routes_by_name()[WEBHOOK_ROUTE]["request_headers_to_remove"]

        for header in ("x-org-id", "x-api-key-id", "x-arxio-principal"):
            assert header in removed

    def test_only_signed_routes_skip_auth(self):
        signed = methods.Authentication.WEBHOOK_SIGNATURE
        for method in methods.public_methods():
            route = routes_by_name().get(method.action)
            if route is None:
                continue
            per_filter = route.get("typed_per_filter_config", {})
            ext_authz = per_filter.get("envoy.filters.http.ext_authz", {})
            skips = ext_authz.get("disabled", False)
            assert skips == (method.authentication == signed), method.action

    def test_grpc_route_keeps_auth_decision(self):
        """A native gRPC call to the webhook RPC still needs a key."""
        route = routes_by_name()["grpc/arxio.billing.v1.BillingService"]
        per_filter = route.get("typed_per_filter_config", {})
        ext_authz = per_filter.get("envoy.filters.http.ext_authz", {})

        assert not ext_authz.get("disabled", False)
