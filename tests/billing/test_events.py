"""Stripe events applied to a real PostgreSQL, with the auth service faked."""

import asyncio
import datetime
import itertools

import grpc
import pytest
from sqlalchemy import text

from services.billing import store, webhooks
from services.billing.accounts import AccountError, Plan
from services.billing.events import EventProcessor
from tests.billing.conftest import FakeAccounts, open_store

pytestmark = pytest.mark.usefixtures("billing_database_url")

T0 = 1_790_000_000
_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_ids)}_{id(_ids)}"


def subscription_event(
    event_type: str,
    subscription_id: str,
    customer_id: str,
    status: str,
    created: int,
    org_id: str | None = None,
    prices: tuple[str, ...] = ("price_pro",),
) -> webhooks.StripeEvent:
    return webhooks.StripeEvent(
        event_id=unique("evt"),
        event_type=event_type,
        time=datetime.datetime.fromtimestamp(created, datetime.UTC),
        data={
            "id": subscription_id,
            "object": "subscription",
            "customer": customer_id,
            "status": status,
            "metadata": {"org_id": org_id} if org_id else {},
            "items": {"data": [{"price": {"id": p}} for p in prices]},
        },
    )


def invoice_event(event_type: str, customer_id: str, created: int):
    return webhooks.StripeEvent(
        event_id=unique("evt"),
        event_type=event_type,
        time=datetime.datetime.fromtimestamp(created, datetime.UTC),
        data={
            "id": unique("in"),
            "object": "invoice",
            "customer": customer_id,
            "amount_due": 4900,
            "currency": "usd",
        },
    )


@pytest.fixture
def database_url(billing_database_url):
    return billing_database_url[0]


async def process_all(url, accounts, events, pro_price_id="price_pro"):
    async with open_store(url) as billing_store:
        processor = EventProcessor(billing_store, accounts, pro_price_id)

        return [await processor.process(event) for event in events]


def run(coroutine):
    return asyncio.run(coroutine)


class TestSubscriptionEvents:
    def test_active_subscription_makes_pro(self, database_url):
        accounts = FakeAccounts()
        org_id = accounts.add()
        event = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            unique("cus"),
            "active",
            T0,
            org_id,
        )

        [outcome] = run(process_all(database_url, accounts, [event]))

        assert "applied: active" == outcome.outcome
        assert org_id == outcome.org_id
        assert Plan.PRO == accounts.plan(org_id)
        assert [(org_id, Plan.PRO, [Plan.FREE])] == accounts.plan_calls

    def test_same_event_twice_processed_once(self, database_url):
        accounts = FakeAccounts()
        org_id = accounts.add()
        event = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            unique("cus"),
            "active",
            T0,
            org_id,
        )

        first, second = run(process_all(database_url, accounts, [event] * 2))

        assert not first.duplicate
        assert second.duplicate
        assert 1 == len(accounts.plan_calls)

    def test_older_event_never_restores_state(self, database_url):
        """Canceled at T0+20 stays canceled when T0+10's past_due comes."""
        accounts = FakeAccounts()
        org_id = accounts.add()
        subscription_id, customer_id = unique("sub"), unique("cus")
        events = [
            subscription_event(
                "customer.subscription.created",
                subscription_id,
                customer_id,
                "active",
                T0,
                org_id,
            ),
            subscription_event(
                "customer.subscription.deleted",
                subscription_id,
                customer_id,
                "canceled",
                T0 + 20,
                org_id,
            ),
            subscription_event(
                "customer.subscription.updated",
                subscription_id,
                customer_id,
                "past_due",
                T0 + 10,
                org_id,
            ),
        ]

        outcomes = run(process_all(database_url, accounts, events))

        assert [
            "applied: active",
            "applied: canceled",
            "stale: kept canceled",
        ] == [outcome.outcome for outcome in outcomes]
        assert Plan.FREE == accounts.plan(org_id)
        assert [
            (org_id, Plan.PRO, [Plan.FREE]),
            (org_id, Plan.FREE, [Plan.PRO]),
        ] == accounts.plan_calls

    def test_late_created_event_ignored(self, database_url):
        """`updated: active` first, then the older `created: incomplete`."""
        accounts = FakeAccounts()
        org_id = accounts.add()
        subscription_id, customer_id = unique("sub"), unique("cus")
        events = [
            subscription_event(
                "customer.subscription.updated",
                subscription_id,
                customer_id,
                "active",
                T0 + 1,
                org_id,
            ),
            subscription_event(
                "customer.subscription.created",
                subscription_id,
                customer_id,
                "incomplete",
                T0,
                org_id,
            ),
        ]

        outcomes = run(process_all(database_url, accounts, events))

        assert "stale: kept active" == outcomes[1].outcome
        assert Plan.PRO == accounts.plan(org_id)

    def test_enterprise_plan_kept(self, database_url):
        accounts = FakeAccounts()
        org_id = accounts.add(Plan.ENTERPRISE)
        event = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            unique("cus"),
            "active",
            T0,
            org_id,
        )

        run(process_all(database_url, accounts, [event]))

        assert Plan.ENTERPRISE == accounts.plan(org_id)

    def test_other_price_grants_nothing(self, database_url):
        accounts = FakeAccounts()
        org_id = accounts.add()
        event = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            unique("cus"),
            "active",
            T0,
            org_id,
            prices=("price_other",),
        )

        [outcome] = run(process_all(database_url, accounts, [event]))

        assert "ignored: not a Pro plan subscription" == outcome.outcome
        assert Plan.FREE == accounts.plan(org_id)

    def test_unknown_customer_ignored(self, database_url):
        accounts = FakeAccounts()
        event = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            unique("cus"),
            "active",
            T0,
        )

        [outcome] = run(process_all(database_url, accounts, [event]))

        assert "ignored: no organization for this customer" == outcome.outcome
        assert [] == accounts.plan_calls

    def test_auth_unavailable_rolls_back(self, database_url):
        """The event is not recorded, so Stripe's redelivery applies it."""
        accounts = FakeAccounts()
        org_id = accounts.add()
        event = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            unique("cus"),
            "active",
            T0,
            org_id,
        )
        accounts.unavailable = True

        with pytest.raises(AccountError) as raised:
            run(process_all(database_url, accounts, [event]))
        accounts.unavailable = False
        [retried] = run(process_all(database_url, accounts, [event]))

        assert grpc.StatusCode.UNAVAILABLE == raised.value.code
        assert not retried.duplicate
        assert Plan.PRO == accounts.plan(org_id)


class TestInvoiceEvents:
    def test_paid_and_failed_recorded(self, database_url):
        accounts = FakeAccounts()
        org_id = accounts.add()
        customer_id = unique("cus")
        created = subscription_event(
            "customer.subscription.created",
            unique("sub"),
            customer_id,
            "active",
            T0,
            org_id,
        )
        events = [
            created,
            invoice_event("invoice.paid", customer_id, T0 + 1),
            invoice_event("invoice.payment_failed", customer_id, T0 + 2),
        ]

        outcomes = run(process_all(database_url, accounts, events))

        assert "recorded: invoice paid" == outcomes[1].outcome
        assert "recorded: invoice payment_failed" == outcomes[2].outcome
        assert Plan.PRO == accounts.plan(org_id)

    def test_unknown_customer_ignored(self, database_url):
        event = invoice_event("invoice.paid", unique("cus"), T0)

        [outcome] = run(process_all(database_url, FakeAccounts(), [event]))

        assert "ignored: no organization for this customer" == outcome.outcome


class TestRowLevelSecurity:
    def test_org_scope_hides_other_orgs(self, database_url):
        accounts = FakeAccounts()
        first, second = accounts.add(), accounts.add()
        events = [
            subscription_event(
                "customer.subscription.created",
                unique("sub"),
                unique("cus"),
                "active",
                T0,
                org_id,
            )
            for org_id in (first, second)
        ]
        run(process_all(database_url, accounts, events))

        async def visible_orgs(scope) -> set[str]:
            async with open_store(database_url) as billing_store:
                async with billing_store.sessions.begin() as session:
                    await scope(session)
                    rows = await session.execute(
                        text("SELECT org_id::text FROM billing.subscriptions")
                    )

                    return {row[0] for row in rows}

        scoped = run(visible_orgs(lambda s: store.scope_to_org(s, first)))
        unscoped = run(visible_orgs(lambda s: asyncio.sleep(0)))

        assert {first} == scoped
        assert set() == unscoped
