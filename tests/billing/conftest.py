"""Fixtures of the billing tests: a local Stripe and a real PostgreSQL."""

import contextlib
import datetime
import uuid

import grpc
import pytest
from arxio.auth.v1 import organization_pb2
from arxio.internal.v1 import accounts_pb2

from services.billing.accounts import AccountError, Plan
from services.billing.config import StripeConfig
from services.billing.store import BillingStore
from services.common.migrations import service_role
from tests.billing.fake_stripe import API_KEY, FakeStripe
from tests.suite import migrated_database


def stripe_config(base_url: str, **changes) -> StripeConfig:
    settings = {
        "api_key": API_KEY,
        "api_base": base_url,
        "pro_price_id": "price_pro_monthly",
        "metered_price_id": "price_pro_requests",
        "meter_event_name": "arxio_api_requests",
        "success_url": "https://portal.example.test/billing/done",
        "cancel_url": "https://portal.example.test/billing",
        "portal_return_url": "https://portal.example.test/",
        "max_network_retries": 2,
        "request_timeout": 5.0,
    }

    return StripeConfig(**(settings | changes))


@pytest.fixture
def fake_stripe():
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def billing_database_url():
    """Start an embedded PostgreSQL with every migration applied.

    Return a URL that logs in as the billing service's own role, so the
    tests run under its grants and row-level security.
    """
    from services.common import db

    with migrated_database("billing-") as admin_url:
        yield db.with_user(admin_url, service_role("billing")), admin_url


class FakeAccounts:
    """The auth service's AccountService as billing uses it, in memory."""

    def __init__(self) -> None:
        self.organizations: dict[str, organization_pb2.Organization] = {}
        # (org_id, day) -> request count
        self.usage: dict[tuple[str, datetime.date], int] = {}
        self.plan_calls: list[tuple[str, int, list[int]]] = []
        # When set, every call fails as an unreachable auth service would.
        self.unavailable = False

    def add(self, plan: int = Plan.FREE, name: str = "Test Hospital") -> str:
        org_id = str(uuid.uuid4())
        self.organizations[org_id] = organization_pb2.Organization(
            org_id=org_id, name=name, plan=plan
        )

        return org_id

    def plan(self, org_id: str) -> int:
        return self.organizations[org_id].plan

    def _check(self, org_id: str) -> organization_pb2.Organization:
        if self.unavailable:
            raise AccountError(grpc.StatusCode.UNAVAILABLE, "auth is down")
        if org_id not in self.organizations:
            raise AccountError(grpc.StatusCode.NOT_FOUND, "no such org")

        return self.organizations[org_id]

    async def get_organization(self, org_id: str):
        return self._check(org_id)

    async def daily_usage(self, org_id, first, last):
        self._check(org_id)

        return sorted(
            (day, count)
            for (owner, day), count in self.usage.items()
            if owner == org_id and first <= day <= last
        )

    async def set_plan(self, org_id, plan, current_plans):
        organization = self._check(org_id)
        self.plan_calls.append((org_id, plan, list(current_plans)))
        changed = organization.plan != plan and (
            not current_plans or organization.plan in current_plans
        )
        if changed:
            organization.plan = plan

        return accounts_pb2.SetOrganizationPlanResponse(
            organization=organization, changed=changed
        )


@contextlib.asynccontextmanager
async def open_store(url: str):
    from services.common import db

    engine = db.create_engine(url, pool_size=2)
    try:
        yield BillingStore(db.session_factory(engine))
    finally:
        await engine.dispose()
