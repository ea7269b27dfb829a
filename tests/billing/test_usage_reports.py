"""The daily usage job: real PostgreSQL, a local Stripe, auth faked."""

import asyncio
import datetime
import uuid

import pytest

from services.billing import webhooks
from services.billing.accounts import Plan
from services.billing.config import UsageReportConfig
from services.billing.events import EventProcessor
from services.billing.stripe_gateway import StripeGateway
from services.billing.usage_reports import (
    UsageReporter,
    last_final_day,
    meter_identifier,
    meter_timestamp,
)
from tests.billing.conftest import FakeAccounts, open_store, stripe_config

pytestmark = pytest.mark.usefixtures("billing_database_url")

METER_PATH = "/v1/billing/meter_events"
NOW = datetime.datetime(2026, 10, 10, 12, 0, tzinfo=datetime.UTC)
# The subscription starts granting Pro on this day.
START = datetime.datetime(2026, 10, 5, 9, 30, tzinfo=datetime.UTC)
CONFIG = UsageReportConfig(interval=1.0, lookback_days=30, settle_seconds=600)


def day(value: str) -> datetime.date:
    return datetime.date.fromisoformat(value)


@pytest.fixture
def database_url(billing_database_url):
    return billing_database_url[0]


async def subscribe(url: str, accounts: FakeAccounts, org_id: str) -> None:
    event = webhooks.StripeEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        event_type="customer.subscription.created",
        time=START,
        data={
            "id": f"sub_{uuid.uuid4().hex}",
            "customer": f"cus_{uuid.uuid4().hex}",
            "status": "active",
            "metadata": {"org_id": org_id},
        },
    )
    async with open_store(url) as billing_store:
        await EventProcessor(billing_store, accounts).process(event)


async def run_reporters(url, accounts, base_url, count=1, now=NOW):
    async with open_store(url) as billing_store:
        reporters = [
            UsageReporter(
                billing_store,
                accounts,
                StripeGateway(stripe_config(base_url)),
                CONFIG,
                "arxio_api_requests",
                clock=lambda: now,
            )
            for _ in range(count)
        ]

        return await asyncio.gather(*(r.run_once() for r in reporters))


def pro_org(database_url, usage: dict[str, int]) -> tuple[FakeAccounts, str]:
    accounts = FakeAccounts()
    org_id = accounts.add()
    asyncio.run(subscribe(database_url, accounts, org_id))
    for date, count in usage.items():
        accounts.usage[(org_id, day(date))] = count

    return accounts, org_id


def sent_for(fake_stripe, org_id: str) -> list[dict[str, str]]:
    """Return the meter events Stripe accepted for one organization."""
    return [
        request.parameters
        for request in fake_stripe.requests_to(METER_PATH)
        if org_id in request.parameters["identifier"]
        and request.status == 200
        and not request.replayed
    ]


class TestFinalDay:
    def test_yesterday_after_settling(self):
        assert day("2026-10-09") == last_final_day(NOW, 600)

    def test_day_before_yesterday_right_after_midnight(self):
        just_after = datetime.datetime(2026, 10, 10, 0, 5, tzinfo=datetime.UTC)

        assert day("2026-10-08") == last_final_day(just_after, 600)

    def test_timestamp_is_last_second_of_day(self):
        assert datetime.datetime(
            2026, 10, 9, 23, 59, 59, tzinfo=datetime.UTC
        ) == meter_timestamp(day("2026-10-09"))


class TestReports:
    def test_each_final_day_sent_once(self, database_url, fake_stripe):
        accounts, org_id = pro_org(
            database_url,
            {
                "2026-10-04": 7,
                "2026-10-05": 3,
                "2026-10-08": 12,
                "2026-10-09": 5,
                "2026-10-10": 9,
            },
        )

        asyncio.run(
            run_reporters(database_url, accounts, fake_stripe.base_url)
        )
        after_first_run = len(sent_for(fake_stripe, org_id))
        asyncio.run(
            run_reporters(database_url, accounts, fake_stripe.base_url)
        )

        sent = sent_for(fake_stripe, org_id)
        assert [] == fake_stripe.state.violations
        assert 3 == after_first_run
        assert [
            (meter_identifier(org_id, day("2026-10-05")), "3"),
            (meter_identifier(org_id, day("2026-10-08")), "12"),
            (meter_identifier(org_id, day("2026-10-09")), "5"),
        ] == [(p["identifier"], p["payload[value]"]) for p in sent]
        assert {p["identifier"] for p in sent} == {
            r.headers["idempotency-key"]
            for r in fake_stripe.requests_to(METER_PATH)
        }

    def test_concurrent_jobs_send_once(self, database_url, fake_stripe):
        accounts, org_id = pro_org(
            database_url, {"2026-10-06": 4, "2026-10-07": 8}
        )

        asyncio.run(
            run_reporters(
                database_url, accounts, fake_stripe.base_url, count=3
            )
        )

        assert 2 == len(sent_for(fake_stripe, org_id))

    def test_failed_send_retried_next_run(self, database_url, fake_stripe):
        accounts, org_id = pro_org(database_url, {"2026-10-06": 4})
        fake_stripe.fail_next(3, status=500)

        [failed] = asyncio.run(
            run_reporters(database_url, accounts, fake_stripe.base_url)
        )
        after_failure = len(sent_for(fake_stripe, org_id))
        asyncio.run(
            run_reporters(database_url, accounts, fake_stripe.base_url)
        )

        assert failed.failed >= 1
        assert 0 == after_failure
        assert 1 == len(sent_for(fake_stripe, org_id))

    def test_operator_plan_change_stops_reports(
        self, database_url, fake_stripe
    ):
        accounts, org_id = pro_org(database_url, {"2026-10-06": 4})
        accounts.organizations[org_id].plan = Plan.ENTERPRISE

        asyncio.run(
            run_reporters(database_url, accounts, fake_stripe.base_url)
        )

        assert [] == sent_for(fake_stripe, org_id)
