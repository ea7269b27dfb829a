"""Plans and daily usage of the caller's organization, read from auth."""

import datetime
import uuid

import grpc
from arxio.billing.v1 import billing_pb2, billing_pb2_grpc
from arxio.internal.v1 import accounts_pb2, accounts_pb2_grpc

from services.common.errors import FieldViolation, abort, abort_invalid
from services.common.identity import caller_org_id
from services.common.plans import plan_limits, plan_name

# Deadline in seconds of each call to the auth service.
AUTH_DEADLINE = 2.0
# The longest range one usage request may cover, in days.
MAX_RANGE_DAYS = 366


def _parse_date(
    value: str, field: str, violations: list[FieldViolation]
) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        violations.append(
            FieldViolation(field, f"{value[:40]!r} is not a YYYY-MM-DD date")
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


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, accounts: accounts_pb2_grpc.AccountServiceStub) -> None:
        self._accounts = accounts

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

    async def _call_auth(self, context, call, request):
        try:
            return await call(request, timeout=AUTH_DEADLINE)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code not in (grpc.StatusCode.NOT_FOUND,):
                code = grpc.StatusCode.UNAVAILABLE
            await abort(
                context, code, f"account data unavailable: {error.details()}"
            )

    async def GetUsage(self, request, context):
        org_id = await self._org_id(context)
        today = datetime.datetime.now(datetime.UTC).date()
        resolved = usage_range(request.start_date, request.end_date, today)
        if isinstance(resolved, list):
            await abort_invalid(context, resolved)
        first, last = resolved
        reply = await self._call_auth(
            context,
            self._accounts.ListDailyUsage,
            accounts_pb2.ListDailyUsageRequest(
                org_id=org_id,
                start_date=first.isoformat(),
                end_date=last.isoformat(),
            ),
        )
        days = [
            billing_pb2.DailyUsage(
                date=day.date, request_count=day.request_count
            )
            for day in reply.days
        ]

        return billing_pb2.Usage(
            start_date=first.isoformat(),
            end_date=last.isoformat(),
            days=days,
            total_requests=sum(day.request_count for day in days),
        )

    async def GetSubscription(self, request, context):
        org_id = await self._org_id(context)
        organization = await self._call_auth(
            context,
            self._accounts.GetOrganization,
            accounts_pb2.GetOrganizationRequest(org_id=org_id),
        )
        limit = plan_limits()[plan_name(organization.plan)]
        subscription = billing_pb2.Subscription(
            plan=organization.plan,
            unlimited=limit.daily_request_limit is None,
        )
        if limit.daily_request_limit is not None:
            subscription.daily_request_limit = limit.daily_request_limit

        return subscription
