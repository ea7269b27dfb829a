"""The billing API: plans and usage of the caller's organization, Stripe
checkout and portal sessions, and Stripe's webhook."""

import datetime
import uuid

import grpc
import structlog
from arxio.billing.v1 import billing_pb2, billing_pb2_grpc
from google.protobuf import timestamp_pb2
from sqlalchemy.exc import SQLAlchemyError

from services.billing import webhooks
from services.billing.accounts import AccountError, AccountsClient, Plan
from services.billing.events import EventProcessor
from services.billing.store import BillingStore
from services.billing.stripe_gateway import StripeFailure, StripeGateway
from services.common.errors import FieldViolation, abort, abort_invalid
from services.common.identity import (
    caller_org_id,
    metadata_value,
    request_id_of,
)
from services.common.plans import plan_limits, plan_name

log = structlog.get_logger()
# The longest range one usage request may cover, in days.
MAX_RANGE_DAYS = 366


def _parse_date(
    value: str, field: str, violations: list[FieldViolation]
) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        violations.append(
            FieldViolation(field, "must be a date in the form YYYY-MM-DD")
        )

        return None


def usage_range(
    start: str, end: str, today: datetime.date
) -> tuple[datetime.date, datetime.date] | list[FieldViolation]:
    """Resolve a request's date range; the default is this UTC month."""
    violations: list[FieldViolation] = []
    first = today.replace(day=1)
    if start:
        first = _parse_date(start, "startDate", violations)
    last = today
    if end:
        last = _parse_date(end, "endDate", violations)
    if violations:
        return violations
    if last < first:
        return [FieldViolation("endDate", "must not be before startDate")]
    if (last - first).days >= MAX_RANGE_DAYS:
        return [
            FieldViolation(
                "endDate", f"the range may cover at most {MAX_RANGE_DAYS} days"
            )
        ]

    return first, last


def _timestamp(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)

    return stamp


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(
        self,
        accounts: AccountsClient,
        billing_store: BillingStore,
        events: EventProcessor,
        gateway: StripeGateway | None,
        webhook_secret: str | None,
        webhook_tolerance: int,
    ) -> None:
        self._accounts = accounts
        self._store = billing_store
        self._events = events
        # None when no STRIPE_API_KEY is configured.
        self._gateway = gateway
        self._webhook_secret = webhook_secret
        self._webhook_tolerance = webhook_tolerance

    async def _org_id(self, context) -> str:
        org_id = caller_org_id(context)
        try:
            uuid.UUID(org_id)
        except ValueError:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no organization on the request: call through the edge",
            )

        return org_id

    async def _account_call(self, context, call):
        try:
            return await call
        except AccountError as error:
            await abort(context, error.code, error.message)

    async def _store_call(self, context, call):
        try:
            return await call
        except (SQLAlchemyError, OSError) as error:
            log.error("billing.database_failed", error=type(error).__name__)
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "billing records are unavailable: retry shortly",
            )

    async def _stripe_call(self, context, call):
        try:
            return await call
        except StripeFailure as failure:
            await abort(context, failure.code, failure.message)

    async def GetUsage(self, request, context):
        org_id = await self._org_id(context)
        today = datetime.datetime.now(datetime.UTC).date()
        resolved = usage_range(request.start_date, request.end_date, today)
        if isinstance(resolved, list):
            await abort_invalid(context, resolved)
        first, last = resolved
        usage = await self._account_call(
            context, self._accounts.daily_usage(org_id, first, last)
        )
        days = [
            billing_pb2.DailyUsage(date=day.isoformat(), request_count=count)
            for day, count in usage
        ]

        return billing_pb2.Usage(
            start_date=first.isoformat(),
            end_date=last.isoformat(),
            days=days,
            total_requests=sum(day.request_count for day in days),
        )

    async def GetSubscription(self, request, context):
        org_id = await self._org_id(context)
        organization = await self._account_call(
            context, self._accounts.get_organization(org_id)
        )
        limit = plan_limits()[plan_name(organization.plan)]
        subscription = billing_pb2.Subscription(
            plan=organization.plan,
            unlimited=limit.daily_request_limit is None,
        )
        if limit.daily_request_limit is not None:
            subscription.daily_request_limit = limit.daily_request_limit
        stored = await self._store_call(
            context, self._store.latest_subscription(org_id)
        )
        if stored is not None:
            subscription.stripe_status = stored.status
            subscription.status_time.CopyFrom(_timestamp(stored.status_time))

        return subscription

    async def _require_gateway(self, context) -> StripeGateway:
        if self._gateway is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "billing through Stripe is not configured on this "
                "deployment: the operator must set STRIPE_API_KEY; plans "
                "and usage remain readable",
            )

        return self._gateway

    async def _customer(
        self, context, gateway: StripeGateway, org_id: str, name: str
    ) -> str:
        """Return the organization's Stripe customer, creating it once."""
        customer_id = await self._store_call(
            context, self._store.customer_of_org(org_id)
        )
        if customer_id is not None:
            return customer_id
        created = await self._stripe_call(
            context, gateway.create_customer(org_id, name)
        )

        return await self._store_call(
            context, self._store.save_customer(org_id, created)
        )

    def _request_key(self, context) -> str:
        # The edge's request id is unique per client request, so the
        # SDK's retries of one request share it and nothing else does.
        return request_id_of(context)[:100] or str(uuid.uuid4())

    async def CreateCheckoutSession(self, request, context):
        org_id = await self._org_id(context)
        gateway = await self._require_gateway(context)
        organization = await self._account_call(
            context, self._accounts.get_organization(org_id)
        )
        if organization.plan != Plan.FREE:
            plan = Plan.Name(organization.plan)
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"organization {org_id} is already on the {plan} plan: "
                "checkout upgrades Free to Pro; manage an existing "
                "subscription at POST /v1/billing/portal",
            )
        customer_id = await self._customer(
            context, gateway, org_id, organization.name
        )
        link = await self._stripe_call(
            context,
            gateway.create_checkout_session(
                org_id, customer_id, self._request_key(context)
            ),
        )
        log.info("billing.checkout_created", org_id=org_id)

        return billing_pb2.CheckoutSession(
            url=link.url, expire_time=_timestamp(link.expire_time)
        )

    async def CreatePortalSession(self, request, context):
        org_id = await self._org_id(context)
        gateway = await self._require_gateway(context)
        organization = await self._account_call(
            context, self._accounts.get_organization(org_id)
        )
        customer_id = await self._customer(
            context, gateway, org_id, organization.name
        )
        url = await self._stripe_call(
            context,
            gateway.create_portal_session(
                customer_id, self._request_key(context)
            ),
        )

        return billing_pb2.PortalSession(url=url)

    async def HandleStripeWebhook(self, request, context):
        if self._webhook_secret is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "Stripe webhooks are not configured on this deployment: "
                "the operator must set STRIPE_WEBHOOK_SECRET",
            )
        header = metadata_value(context, webhooks.SIGNATURE_HEADER)
        try:
            event = webhooks.verify_event(
                request.body.data,
                header,
                self._webhook_secret,
                self._webhook_tolerance,
            )
        except webhooks.InvalidWebhook as error:
            log.warning("billing.webhook_rejected", reason=str(error))
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            outcome = await self._store_call(
                context, self._events.process(event)
            )
        except AccountError as error:
            log.warning(
                "billing.webhook_failed",
                event_id=event.event_id,
                error=error.message,
            )
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"event {event.event_id} was not processed: "
                f"{error.message}; Stripe retries the delivery",
            )

        return billing_pb2.StripeWebhookResponse(duplicate=outcome.duplicate)
