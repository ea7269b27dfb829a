"""Calls to the auth service's internal AccountService over mutual TLS."""

import datetime

import grpc
from arxio.auth.v1 import organization_pb2
from arxio.internal.v1 import accounts_pb2, accounts_pb2_grpc

# Deadline in seconds of each call to the auth service.
AUTH_DEADLINE = 2.0
Plan = organization_pb2.Organization.Plan


class AccountError(Exception):
    """A failed call to the auth service, with the status to pass on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AccountsClient:
    def __init__(self, stub: accounts_pb2_grpc.AccountServiceStub) -> None:
        self._stub = stub

    async def _call(self, call, request, operation: str):
        try:
            return await call(request, timeout=AUTH_DEADLINE)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code != grpc.StatusCode.NOT_FOUND:
                code = grpc.StatusCode.UNAVAILABLE
            raise AccountError(
                code, f"{operation} failed: {error.details()}"
            ) from None

    async def get_organization(
        self, org_id: str
    ) -> organization_pb2.Organization:
        return await self._call(
            self._stub.GetOrganization,
            accounts_pb2.GetOrganizationRequest(org_id=org_id),
            "reading the organization",
        )

    async def daily_usage(
        self, org_id: str, first: datetime.date, last: datetime.date
    ) -> list[tuple[datetime.date, int]]:
        reply = await self._call(
            self._stub.ListDailyUsage,
            accounts_pb2.ListDailyUsageRequest(
                org_id=org_id,
                start_date=first.isoformat(),
                end_date=last.isoformat(),
            ),
            "reading daily usage",
        )

        return [
            (datetime.date.fromisoformat(day.date), day.request_count)
            for day in reply.days
        ]

    async def set_plan(
        self, org_id: str, plan: int, current_plans: list[int]
    ) -> accounts_pb2.SetOrganizationPlanResponse:
        """Change the plan while the current one is in `current_plans`."""
        return await self._call(
            self._stub.SetOrganizationPlan,
            accounts_pb2.SetOrganizationPlanRequest(
                org_id=org_id, plan=plan, current_plans=current_plans
            ),
            "changing the organization's plan",
        )
