"""Queries of the billing schema.

Each transaction names what it may see: one organization (`arxio.org_id`)
for the API's reads, or every organization (`arxio.all_orgs`) for the
webhook handler and the usage job, which work across organizations.
PostgreSQL's row-level security enforces that scope.
"""

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


@dataclass(frozen=True)
class SubscriptionRow:
    subscription_id: str
    org_id: str
    customer_id: str
    status: str
    status_time: datetime.datetime
    entitle_time: datetime.datetime | None


@dataclass(frozen=True)
class ProCustomer:
    """An organization whose subscription grants Pro, for usage reports."""

    org_id: str
    customer_id: str
    # When the subscription started granting Pro.
    entitle_time: datetime.datetime


_SUBSCRIPTION_COLUMNS = (
    "stripe_subscription_id, org_id::text, stripe_customer_id, status,"
    " status_time, entitle_time"
)


async def scope_to_org(session: AsyncSession, org_id: str) -> None:
    await session.execute(
        text("SELECT set_config('arxio.org_id', :org_id, true)"),
        {"org_id": org_id},
    )


async def scope_to_all_orgs(session: AsyncSession) -> None:
    await session.execute(
        text("SELECT set_config('arxio.all_orgs', 'on', true)")
    )


async def lock_org(session: AsyncSession, org_id: str) -> None:
    """Serialize changes to one organization's billing until commit."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"billing:{org_id}"},
    )


async def customer_of_org(session: AsyncSession, org_id: str) -> str | None:
    row = (
        await session.execute(
            text(
                "SELECT stripe_customer_id FROM billing.customers"
                " WHERE org_id = :org_id"
            ),
            {"org_id": org_id},
        )
    ).first()

    return None if row is None else row[0]


async def org_of_customer(
    session: AsyncSession, customer_id: str
) -> str | None:
    row = (
        await session.execute(
            text(
                "SELECT org_id::text FROM billing.customers"
                " WHERE stripe_customer_id = :customer_id"
            ),
            {"customer_id": customer_id},
        )
    ).first()

    return None if row is None else row[0]


async def insert_customer(
    session: AsyncSession, org_id: str, customer_id: str
) -> str:
    """Record an organization's customer; return the one that is stored.

    An organization keeps its first customer, so when two requests race
    the stored one wins and both return it.
    """
    await session.execute(
        text(
            "INSERT INTO billing.customers (org_id, stripe_customer_id)"
            " VALUES (:org_id, :customer_id) ON CONFLICT DO NOTHING"
        ),
        {"org_id": org_id, "customer_id": customer_id},
    )
    stored = await customer_of_org(session, org_id)

    return stored or customer_id


async def record_event(
    session: AsyncSession,
    event_id: str,
    event_type: str,
    event_time: datetime.datetime,
) -> bool:
    """Record an event id; return False when it was recorded before.

    A concurrent delivery of the same id waits on the primary key until
    this transaction ends, so only one of them processes the event.
    """
    row = (
        await session.execute(
            text(
                "INSERT INTO billing.stripe_events"
                " (event_id, event_type, event_time, outcome)"
                " VALUES (:event_id, :event_type, :event_time, 'received')"
                " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            ),
            {
                "event_id": event_id,
                "event_type": event_type,
                "event_time": event_time,
            },
        )
    ).first()

    return row is not None


async def finish_event(
    session: AsyncSession, event_id: str, org_id: str | None, outcome: str
) -> None:
    await session.execute(
        text(
            "UPDATE billing.stripe_events SET org_id = :org_id,"
            " outcome = :outcome WHERE event_id = :event_id"
        ),
        {"event_id": event_id, "org_id": org_id, "outcome": outcome},
    )


def _subscription(row) -> SubscriptionRow:
    return SubscriptionRow(*row)


async def get_subscription(
    session: AsyncSession, subscription_id: str
) -> SubscriptionRow | None:
    row = (
        await session.execute(
            text(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM billing.subscriptions"
                " WHERE stripe_subscription_id = :subscription_id"
                " FOR UPDATE"
            ),
            {"subscription_id": subscription_id},
        )
    ).first()

    return None if row is None else _subscription(row)


async def save_subscription(
    session: AsyncSession, row: SubscriptionRow
) -> None:
    await session.execute(
        text(
            "INSERT INTO billing.subscriptions (stripe_subscription_id,"
            " org_id, stripe_customer_id, status, status_time, entitle_time)"
            " VALUES (:subscription_id, :org_id, :customer_id, :status,"
            " :status_time, :entitle_time)"
            " ON CONFLICT (stripe_subscription_id) DO UPDATE SET"
            " status = EXCLUDED.status,"
            " status_time = EXCLUDED.status_time,"
            " entitle_time = EXCLUDED.entitle_time,"
            " update_time = now()"
        ),
        {
            "subscription_id": row.subscription_id,
            "org_id": row.org_id,
            "customer_id": row.customer_id,
            "status": row.status,
            "status_time": row.status_time,
            "entitle_time": row.entitle_time,
        },
    )


async def org_entitled(session: AsyncSession, org_id: str) -> bool:
    """Tell whether any of the organization's subscriptions grants Pro."""
    row = (
        await session.execute(
            text(
                "SELECT 1 FROM billing.subscriptions WHERE org_id = :org_id"
                " AND entitle_time IS NOT NULL LIMIT 1"
            ),
            {"org_id": org_id},
        )
    ).first()

    return row is not None


async def save_invoice(
    session: AsyncSession,
    org_id: str,
    invoice_id: str,
    subscription_id: str | None,
    status: str,
    status_time: datetime.datetime,
    amount_due: int,
    currency: str,
) -> bool:
    """Store an invoice's payment result unless a newer one is stored."""
    row = (
        await session.execute(
            text(
                "INSERT INTO billing.invoices (stripe_invoice_id, org_id,"
                " stripe_subscription_id, status, status_time, amount_due,"
                " currency) VALUES (:invoice_id, :org_id, :subscription_id,"
                " :status, :status_time, :amount_due, :currency)"
                " ON CONFLICT (stripe_invoice_id) DO UPDATE SET"
                " status = EXCLUDED.status,"
                " status_time = EXCLUDED.status_time,"
                " amount_due = EXCLUDED.amount_due"
                " WHERE billing.invoices.status_time < EXCLUDED.status_time"
                " RETURNING stripe_invoice_id"
            ),
            {
                "invoice_id": invoice_id,
                "org_id": org_id,
                "subscription_id": subscription_id,
                "status": status,
                "status_time": status_time,
                "amount_due": amount_due,
                "currency": currency,
            },
        )
    ).first()

    return row is not None


class BillingStore:
    """Transactions of the billing schema, one per RPC or job step."""

    def __init__(self, sessions: async_sessionmaker) -> None:
        self.sessions = sessions

    async def customer_of_org(self, org_id: str) -> str | None:
        async with self.sessions.begin() as session:
            await scope_to_org(session, org_id)

            return await customer_of_org(session, org_id)

    async def save_customer(self, org_id: str, customer_id: str) -> str:
        async with self.sessions.begin() as session:
            await scope_to_org(session, org_id)

            return await insert_customer(session, org_id, customer_id)

    async def latest_subscription(self, org_id: str) -> SubscriptionRow | None:
        """Return the organization's most recently changed subscription."""
        async with self.sessions.begin() as session:
            await scope_to_org(session, org_id)
            row = (
                await session.execute(
                    text(
                        f"SELECT {_SUBSCRIPTION_COLUMNS}"
                        " FROM billing.subscriptions WHERE org_id = :org_id"
                        " ORDER BY (entitle_time IS NOT NULL) DESC,"
                        " status_time DESC LIMIT 1"
                    ),
                    {"org_id": org_id},
                )
            ).first()

        return None if row is None else _subscription(row)

    async def pro_customers(self) -> list[ProCustomer]:
        """List organizations with a subscription that grants Pro."""
        async with self.sessions.begin() as session:
            await scope_to_all_orgs(session)
            rows = await session.execute(
                text(
                    "SELECT s.org_id::text, c.stripe_customer_id,"
                    " min(s.entitle_time) FROM billing.subscriptions s"
                    " JOIN billing.customers c USING (org_id)"
                    " WHERE s.entitle_time IS NOT NULL"
                    " GROUP BY s.org_id, c.stripe_customer_id"
                    " ORDER BY s.org_id"
                )
            )

            return [ProCustomer(*row) for row in rows]

    async def reported_days(
        self, org_id: str, first: datetime.date, last: datetime.date
    ) -> set[datetime.date]:
        async with self.sessions.begin() as session:
            await scope_to_org(session, org_id)
            rows = await session.execute(
                text(
                    "SELECT day FROM billing.usage_reports"
                    " WHERE org_id = :org_id AND day BETWEEN :first AND :last"
                ),
                {"org_id": org_id, "first": first, "last": last},
            )

            return {row[0] for row in rows}

    async def report_usage(
        self,
        org_id: str,
        day: datetime.date,
        request_count: int,
        customer_id: str,
        meter_event_name: str,
        identifier: str,
        send: Callable[[], Awaitable[None]],
    ) -> bool:
        """Record a day's usage report and `send` it, both or neither.

        Return False, sending nothing, when the day is already recorded.
        The inserted row's key stays locked until `send` returns and the
        row commits, so a concurrent job for the same day waits and then
        finds it. If `send` raises, the row is rolled back, and a later run
        sends again with the same identifier, which Stripe deduplicates.
        """
        async with self.sessions.begin() as session:
            await scope_to_org(session, org_id)
            row = (
                await session.execute(
                    text(
                        "INSERT INTO billing.usage_reports (org_id, day,"
                        " request_count, stripe_customer_id,"
                        " meter_event_name, identifier) VALUES (:org_id,"
                        " :day, :request_count, :customer_id,"
                        " :meter_event_name, :identifier)"
                        " ON CONFLICT (org_id, day) DO NOTHING"
                        " RETURNING day"
                    ),
                    {
                        "org_id": org_id,
                        "day": day,
                        "request_count": request_count,
                        "customer_id": customer_id,
                        "meter_event_name": meter_event_name,
                        "identifier": identifier,
                    },
                )
            ).first()
            if row is None:
                return False
            await send()

        return True
