"""Batched quota counting against the suite's PostgreSQL.

Two counters stand for two auth replicas: together they must let exactly
the limit through, number the requests without gaps or repeats, and
store a count equal to the number let through.
"""

import asyncio
import datetime

import psycopg
import pytest

from services.auth.quota import QuotaCounter, QuotaUnavailable
from services.launcher.processes import free_port
from tests.suite import Organization

pytestmark = pytest.mark.e2e

DAY = datetime.date(2026, 3, 1)


def stored_count(stack, org_id: str, day: datetime.date) -> int | None:
    with psycopg.connect(stack.admin_database_url) as connection:
        row = connection.execute(
            "SELECT request_count FROM auth.daily_usage"
            " WHERE org_id = %s AND day = %s",
            (org_id, day),
        ).fetchone()

    return None if row is None else row[0]


async def race(counters, org_id: str, limit: int | None, requests: int):
    async def one(index: int):
        return await counters[index % len(counters)].count(org_id, DAY, limit)

    try:
        return await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        for counter in counters:
            await counter.close()


def counters_of(stack, replicas: int) -> list[QuotaCounter]:
    return [QuotaCounter(stack.database_urls["auth"]) for _ in range(replicas)]


def test_race_lets_exactly_limit_through(stack):
    org = Organization(stack)

    results = asyncio.run(race(counters_of(stack, 2), org.org_id, 100, 400))

    granted = [result for result in results if result is not None]
    assert list(range(1, 101)) == sorted(granted)
    assert 300 == results.count(None)
    assert 100 == stored_count(stack, org.org_id, DAY)


def test_unlimited_counts_every_request(stack):
    org = Organization(stack)

    results = asyncio.run(race(counters_of(stack, 2), org.org_id, None, 250))

    assert list(range(1, 251)) == sorted(results)
    assert 250 == stored_count(stack, org.org_id, DAY)


def test_organizations_in_one_batch_count_apart(stack):
    first, second = Organization(stack), Organization(stack)
    counter = QuotaCounter(stack.database_urls["auth"])

    async def both():
        try:
            return await asyncio.gather(
                *(counter.count(first.org_id, DAY, 3) for _ in range(5)),
                *(counter.count(second.org_id, DAY, 10) for _ in range(5)),
            )
        finally:
            await counter.close()

    results = asyncio.run(both())

    assert [1, 2, 3, None, None] == results[:5]
    assert [1, 2, 3, 4, 5] == results[5:]
    assert 3 == stored_count(stack, first.org_id, DAY)
    assert 5 == stored_count(stack, second.org_id, DAY)


def test_days_count_apart(stack):
    org = Organization(stack)
    counter = QuotaCounter(stack.database_urls["auth"])
    next_day = DAY + datetime.timedelta(days=1)

    async def two_days():
        try:
            return [
                await counter.count(org.org_id, DAY, 1),
                await counter.count(org.org_id, DAY, 1),
                await counter.count(org.org_id, next_day, 1),
            ]
        finally:
            await counter.close()

    assert [1, None, 1] == asyncio.run(two_days())


def test_dead_connection_replaced(stack):
    """A kept connection that PostgreSQL closed costs no request."""
    org = Organization(stack)
    counter = QuotaCounter(stack.database_urls["auth"])

    async def count_across_a_dropped_connection():
        try:
            first = await counter.count(org.org_id, DAY, 10)
            with psycopg.connect(stack.admin_database_url) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid)"
                    " FROM pg_stat_activity"
                    " WHERE query LIKE '%%auth.daily_usage%%'"
                    " AND pid <> pg_backend_pid()"
                )
            second = await counter.count(org.org_id, DAY, 10)
        finally:
            await counter.close()

        return first, second

    assert (1, 2) == asyncio.run(count_across_a_dropped_connection())


def test_unreachable_database_raises_unavailable():
    counter = QuotaCounter(
        f"postgresql://auth@127.0.0.1:{free_port()}/arxio?connect_timeout=1"
    )

    async def count_twice():
        try:
            for _ in range(2):
                with pytest.raises(QuotaUnavailable) as raised:
                    await counter.count(
                        "00000000-0000-4000-8000-000000000001", DAY, 10
                    )
                # Neither the address nor a credential is in the message.
                assert "127.0.0.1" not in str(raised.value)
        finally:
            await counter.close()

    asyncio.run(count_twice())
