"""Apply verified Stripe events to subscriptions and organization plans.

Each event runs in one transaction that first records its id, so a
redelivery finds the id and changes nothing. Changes to one organization
are serialized by an advisory lock, and a subscription's stored status is
replaced only by a newer event's (see `webhooks.supersedes`). When an
organization gains or loses its last Pro subscription, the auth service's
plan changes before the transaction commits. If that call fails, the whole
event rolls back and Stripe delivers it again.
"""

from dataclasses import dataclass

import grpc
import structlog

from services.billing import store, webhooks
from services.billing.accounts import AccountError, AccountsClient, Plan
from services.billing.store import BillingStore, SubscriptionRow

log = structlog.get_logger()


@dataclass(frozen=True)
class EventOutcome:
    # True when the event id was processed before.
    duplicate: bool
    # Result of processing, as stored with the event id.
    outcome: str
    org_id: str | None = None


class EventProcessor:
    def __init__(
        self,
        billing_store: BillingStore,
        accounts: AccountsClient,
        pro_price_id: str | None = None,
    ) -> None:
        self._store = billing_store
        self._accounts = accounts
        # When set, only subscriptions with this price grant Pro.
        self._pro_price_id = pro_price_id

    async def process(self, event: webhooks.StripeEvent) -> EventOutcome:
        async with self._store.sessions.begin() as session:
            await store.scope_to_all_orgs(session)
            recorded = await store.record_event(
                session, event.event_id, event.event_type, event.time
            )
            if not recorded:
                log.info(
                    "billing.event_duplicate",
                    event_id=event.event_id,
                    event_type=event.event_type,
                )

                return EventOutcome(True, "duplicate")
            org_id, outcome = await self._apply(session, event)
            await store.finish_event(session, event.event_id, org_id, outcome)
        log.info(
            "billing.event_processed",
            event_id=event.event_id,
            event_type=event.event_type,
            org_id=org_id,
            outcome=outcome,
        )

        return EventOutcome(False, outcome, org_id)

    async def _apply(self, session, event) -> tuple[str | None, str]:
        change = webhooks.subscription_change(event)
        if change is not None:
            return await self._apply_subscription(session, change)
        invoice = webhooks.invoice_result(event)
        if invoice is not None:
            return await self._apply_invoice(session, invoice)

        return None, "ignored: event type not handled"

    async def _organization_of(
        self, session, customer_id: str, named_org_id: str | None
    ) -> str | None:
        """Find the organization of a customer, or the one Stripe names.

        A customer this service created is in the customers table. A
        subscription or checkout carries the org id this service put in
        its metadata, which links a customer seen for the first time.
        """
        known = await store.org_of_customer(session, customer_id)
        if known is not None or named_org_id is None:
            return known
        try:
            await self._accounts.get_organization(named_org_id)
        except AccountError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        await store.lock_org(session, named_org_id)
        await store.insert_customer(session, named_org_id, customer_id)

        return named_org_id

    async def _apply_subscription(
        self, session, change: webhooks.SubscriptionChange
    ) -> tuple[str | None, str]:
        org_id = await self._organization_of(
            session, change.customer_id, change.org_id
        )
        if org_id is None:
            return None, "ignored: no organization for this customer"
        if (
            self._pro_price_id
            and change.price_ids
            and self._pro_price_id not in change.price_ids
        ):
            return org_id, "ignored: not a Pro plan subscription"
        await store.lock_org(session, org_id)
        entitled_before = await store.org_entitled(session, org_id)
        stored = await store.get_subscription(session, change.subscription_id)
        if stored is not None and not webhooks.supersedes(
            change.status, change.time, stored.status, stored.status_time
        ):
            return org_id, f"stale: kept {stored.status}"
        entitle_time = None
        if change.status in webhooks.PRO_STATUSES:
            entitle_time = change.time
            if stored is not None and stored.entitle_time is not None:
                entitle_time = stored.entitle_time
        await store.save_subscription(
            session,
            SubscriptionRow(
                subscription_id=change.subscription_id,
                org_id=stored.org_id if stored else org_id,
                customer_id=change.customer_id,
                status=change.status,
                status_time=change.time,
                entitle_time=entitle_time,
            ),
        )
        entitled_after = await store.org_entitled(session, org_id)
        if entitled_after != entitled_before:
            await self._change_plan(org_id, entitled_after)

        return org_id, f"applied: {change.status}"

    async def _change_plan(self, org_id: str, pro: bool) -> None:
        # Only Free becomes Pro and only Pro becomes Free: an operator's
        # Enterprise plan is never changed by billing.
        if pro:
            plan, current = Plan.PRO, [Plan.FREE]
        else:
            plan, current = Plan.FREE, [Plan.PRO]
        try:
            reply = await self._accounts.set_plan(org_id, plan, current)
        except AccountError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("billing.plan_org_not_found", org_id=org_id)
            return
        log.info(
            "billing.plan_changed" if reply.changed else "billing.plan_kept",
            org_id=org_id,
            plan=Plan.Name(reply.organization.plan),
        )

    async def _apply_invoice(
        self, session, invoice: webhooks.InvoiceResult
    ) -> tuple[str | None, str]:
        org_id = await store.org_of_customer(session, invoice.customer_id)
        if org_id is None:
            return None, "ignored: no organization for this customer"
        saved = await store.save_invoice(
            session,
            org_id,
            invoice.invoice_id,
            invoice.subscription_id,
            invoice.status,
            invoice.time,
            invoice.amount_due,
            invoice.currency,
        )
        if not saved:
            return org_id, "stale: a newer invoice result is stored"
        if invoice.status == "payment_failed":
            # Stripe retries the payment and reports the subscription as
            # past_due; the plan follows the subscription's status.
            log.warning(
                "billing.invoice_payment_failed",
                org_id=org_id,
                invoice_id=invoice.invoice_id,
            )

        return org_id, f"recorded: invoice {invoice.status}"
