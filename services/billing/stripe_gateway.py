"""Outbound calls to Stripe through its SDK's async client.

Every call pins the API version and sends an idempotency key derived from
what it creates, so a retry by the SDK or by a caller creates nothing
twice. Network failures are retried a bounded number of times, and Stripe's
errors map to gRPC status codes. Stripe receives only an organization's id
and name, never anything from a clinical request.
"""

import asyncio
import datetime
from dataclasses import dataclass

import grpc
import stripe
import structlog

from services.billing.config import STRIPE_API_VERSION, StripeConfig

log = structlog.get_logger()


class StripeFailure(Exception):
    """A Stripe call that failed, with the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CheckoutLink:
    url: str
    expire_time: datetime.datetime


def _describe(error: stripe.StripeError) -> str:
    request_id = getattr(error, "request_id", None)
    suffix = f" (Stripe request {request_id})" if request_id else ""

    return f"{error.user_message or type(error).__name__}{suffix}"


def failure_of(error: stripe.StripeError, operation: str) -> StripeFailure:
    """Map a Stripe SDK error to a gRPC status and a message.

    Outages, rate limits and network failures are UNAVAILABLE, so callers
    retry. A rejected API key is INTERNAL, because only the operator can
    fix it. A request Stripe rejects is FAILED_PRECONDITION.
    """
    described = _describe(error)
    if isinstance(error, stripe.APIConnectionError):
        return StripeFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"{operation} failed: Stripe is unreachable ({described}); "
            "retry later",
        )
    if isinstance(error, stripe.RateLimitError):
        return StripeFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"{operation} failed: Stripe is rate limiting this account; "
            "retry later",
        )
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        return StripeFailure(
            grpc.StatusCode.INTERNAL,
            f"{operation} failed: Stripe rejected this deployment's API key; "
            "the operator must check STRIPE_API_KEY",
        )
    if isinstance(error, stripe.IdempotencyError):
        return StripeFailure(
            grpc.StatusCode.ABORTED,
            f"{operation} failed: Stripe saw the same idempotency key with "
            f"other parameters ({described})",
        )
    if isinstance(error, stripe.InvalidRequestError | stripe.CardError):
        return StripeFailure(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{operation} failed: Stripe rejected the request: {described}",
        )
    status = error.http_status or 0
    if status >= 500 or isinstance(error, stripe.APIError):
        return StripeFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"{operation} failed: Stripe returned an error ({described}); "
            "retry later",
        )

    return StripeFailure(
        grpc.StatusCode.INTERNAL,
        f"{operation} failed: unexpected Stripe error ({described})",
    )


def build_client(config: StripeConfig) -> stripe.StripeClient:
    """Build a client whose every base address is `config.api_base`."""
    addresses = {
        "api": config.api_base,
        "connect": config.api_base,
        "files": config.api_base,
        "meter_events": config.api_base,
    }

    return stripe.StripeClient(
        config.api_key,
        stripe_version=STRIPE_API_VERSION,
        base_addresses=addresses,
        max_network_retries=config.max_network_retries,
        http_client=stripe.HTTPXClient(timeout=config.request_timeout),
    )


class StripeGateway:
    def __init__(
        self, config: StripeConfig, client: stripe.StripeClient | None = None
    ) -> None:
        self._config = config
        self._client = client or build_client(config)
        # Every attempt, the backoff between attempts and some slack.
        attempts = config.max_network_retries + 1
        self._deadline = attempts * (config.request_timeout + 5.0)

    async def _call(self, operation: str, call):
        try:
            async with asyncio.timeout(self._deadline):
                return await call
        except stripe.StripeError as error:
            failure = failure_of(error, operation)
            log.warning(
                "stripe.call_failed",
                operation=operation,
                error=type(error).__name__,
                http_status=error.http_status,
                stripe_request_id=getattr(error, "request_id", None),
                code=failure.code.name,
            )
            raise failure from None
        except TimeoutError:
            log.warning(
                "stripe.call_timed_out",
                operation=operation,
                deadline_seconds=self._deadline,
            )
            raise StripeFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"{operation} failed: Stripe did not answer within "
                f"{self._deadline:.0f} s; retry later",
            ) from None

    async def create_customer(self, org_id: str, name: str) -> str:
        """Create the organization's Stripe customer and return its id.

        The idempotency key is the org id, so concurrent or repeated first
        requests within Stripe's 24-hour key window get one customer.
        """
        customer = await self._call(
            "creating the Stripe customer",
            self._client.v1.customers.create_async(
                params={"name": name, "metadata": {"org_id": org_id}},
                options={"idempotency_key": f"arxio-customer-{org_id}"},
            ),
        )
        log.info("stripe.customer_created", org_id=org_id)

        return customer.id

    async def create_checkout_session(
        self, org_id: str, customer_id: str, request_key: str
    ) -> CheckoutLink:
        """Create a Checkout session that subscribes the customer to Pro."""
        line_items = [{"price": self._config.pro_price_id, "quantity": 1}]
        if self._config.metered_price_id:
            # Metered prices take no quantity: the meter sets the amount.
            line_items.append({"price": self._config.metered_price_id})
        session = await self._call(
            "creating the Stripe checkout session",
            self._client.v1.checkout.sessions.create_async(
                params={
                    "mode": "subscription",
                    "customer": customer_id,
                    "client_reference_id": org_id,
                    "line_items": line_items,
                    "success_url": self._config.success_url,
                    "cancel_url": self._config.cancel_url,
                    "metadata": {"org_id": org_id},
                    "subscription_data": {"metadata": {"org_id": org_id}},
                },
                options={"idempotency_key": f"arxio-checkout-{request_key}"},
            ),
        )

        return CheckoutLink(
            url=session.url,
            expire_time=datetime.datetime.fromtimestamp(
                session.expires_at, datetime.UTC
            ),
        )

    async def create_portal_session(
        self, customer_id: str, request_key: str
    ) -> str:
        session = await self._call(
            "creating the Stripe customer portal session",
            self._client.v1.billing_portal.sessions.create_async(
                params={
                    "customer": customer_id,
                    "return_url": self._config.portal_return_url,
                },
                options={"idempotency_key": f"arxio-portal-{request_key}"},
            ),
        )

        return session.url

    async def send_meter_event(
        self,
        customer_id: str,
        value: int,
        identifier: str,
        timestamp: datetime.datetime,
    ) -> None:
        """Send one meter event; `identifier` is also the idempotency key."""
        await self._call(
            "sending the usage meter event",
            self._client.v1.billing.meter_events.create_async(
                params={
                    "event_name": self._config.meter_event_name,
                    "identifier": identifier,
                    "timestamp": int(timestamp.timestamp()),
                    "payload": {
                        "stripe_customer_id": customer_id,
                        "value": str(value),
                    },
                },
                options={"idempotency_key": identifier},
            ),
        )
