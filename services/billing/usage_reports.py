"""Send each Pro organization's daily request count to Stripe's meter.

A run reports every finished UTC day, from the later of the lookback
window's start and the day the subscription began granting Pro, that has
requests and no report yet. Each report is one meter event whose
identifier, also its idempotency key, names the organization and day. A
row per organization and day records what was sent, so a day is sent once
however often, and on however many replicas, the job runs.
"""

import asyncio
import datetime
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from services.billing.accounts import AccountError, AccountsClient, Plan
from services.billing.config import UsageReportConfig
from services.billing.store import BillingStore, ProCustomer
from services.billing.stripe_gateway import StripeFailure, StripeGateway

log = structlog.get_logger()

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class RunSummary:
    sent: int = 0
    failed: int = 0


def last_final_day(
    now: datetime.datetime, settle_seconds: int
) -> datetime.date:
    """Return the last UTC day whose count can no longer change."""
    return (now - datetime.timedelta(seconds=settle_seconds)).date() - ONE_DAY


def meter_identifier(org_id: str, day: datetime.date) -> str:
    return f"arxio-usage-{org_id}-{day.isoformat()}"


def meter_timestamp(day: datetime.date) -> datetime.datetime:
    """Return the last second of `day`, which the meter event counts in."""
    start = datetime.datetime.combine(day, datetime.time(), datetime.UTC)

    return start + ONE_DAY - datetime.timedelta(seconds=1)


class UsageReporter:
    def __init__(
        self,
        billing_store: BillingStore,
        accounts: AccountsClient,
        gateway: StripeGateway,
        config: UsageReportConfig,
        meter_event_name: str,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
            datetime.UTC
        ),
    ) -> None:
        self._store = billing_store
        self._accounts = accounts
        self._gateway = gateway
        self._config = config
        self._meter_event_name = meter_event_name
        self._clock = clock

    async def run_once(self) -> RunSummary:
        """Report every pending day of every Pro organization."""
        last = last_final_day(self._clock(), self._config.settle_seconds)
        window_start = last - datetime.timedelta(
            days=self._config.lookback_days - 1
        )
        sent = failed = 0
        # NOTE: a subscription that stopped granting Pro drops out here, so
        # its days not reported yet, including the partial day it ended on,
        # are never sent.
        for customer in await self._store.pro_customers():
            try:
                sent += await self._report(customer, window_start, last)
            except (AccountError, StripeFailure) as error:
                failed += 1
                log.warning(
                    "usage_report.failed",
                    org_id=customer.org_id,
                    error=error.message,
                )

        return RunSummary(sent, failed)

    async def _report(
        self,
        customer: ProCustomer,
        window_start: datetime.date,
        last: datetime.date,
    ) -> int:
        first = max(window_start, customer.entitle_time.date())
        if first > last:
            return 0
        organization = await self._accounts.get_organization(customer.org_id)
        if organization.plan != Plan.PRO:
            # An operator moved it to another plan: nothing is metered.
            return 0
        done = await self._store.reported_days(customer.org_id, first, last)
        usage = await self._accounts.daily_usage(customer.org_id, first, last)
        sent = 0
        for day, count in usage:
            if day in done or count <= 0:
                continue
            identifier = meter_identifier(customer.org_id, day)

            async def send(day=day, count=count, identifier=identifier):
                await self._gateway.send_meter_event(
                    customer.customer_id,
                    count,
                    identifier,
                    meter_timestamp(day),
                )

            reported = await self._store.report_usage(
                customer.org_id,
                day,
                count,
                customer.customer_id,
                self._meter_event_name,
                identifier,
                send,
            )
            if reported:
                sent += 1
                log.info(
                    "usage_report.sent",
                    org_id=customer.org_id,
                    day=day.isoformat(),
                    request_count=count,
                )

        return sent

    async def run_forever(self, stopping: asyncio.Event) -> None:
        """Run every `interval` seconds until `stopping` is set."""
        log.info("usage_report.started", interval=self._config.interval)
        while not stopping.is_set():
            try:
                summary = await self.run_once()
                if summary.sent or summary.failed:
                    log.info(
                        "usage_report.run",
                        sent=summary.sent,
                        failed=summary.failed,
                    )
            except Exception as error:
                # The database may be down; the next run tries again.
                log.error("usage_report.run_failed", error=repr(error))
            try:
                await asyncio.wait_for(stopping.wait(), self._config.interval)
            except TimeoutError:
                pass
        log.info("usage_report.stopped")
