"""Send every pending day of usage to Stripe's meter once, then exit.

    python -m services.billing.report_usage

The usage-report CronJob runs this with the billing service's settings:
DATABASE_URL, ARXIO_TLS_* (the billing certificate, which the auth service
accepts for its AccountService), ARXIO_AUTH_ADDRESS and STRIPE_*. A run
sends what one pass of the billing service's own loop would (see
usage_reports.py), and each day is sent once however many runs overlap,
so set ARXIO_BILLING_USAGE_REPORT_SECONDS=0 on the service to leave the
reports to the schedule. Without STRIPE_API_KEY there is nothing to send.

Exits 0 when nothing failed, 1 when an organization or the database
failed (a later run sends what is still pending) and 2 on invalid settings.
"""

import asyncio
import sys

import grpc
import structlog
from arxio.internal.v1 import accounts_pb2_grpc
from sqlalchemy.exc import SQLAlchemyError

from services.billing.accounts import AccountsClient
from services.billing.config import BillingConfig
from services.billing.store import BillingStore
from services.billing.stripe_gateway import StripeGateway
from services.billing.usage_reports import RunSummary, UsageReporter
from services.common import db
from services.common.config import ConfigError, Environment
from services.common.logging import configure_logging
from services.common.server import channel_credentials

log = structlog.get_logger()

# Connections of one run: the reporter opens one session at a time.
DEFAULT_POOL_SIZE = 1


async def report_once(
    config: BillingConfig, pool: db.PoolSettings
) -> RunSummary:
    """Run the usage reporter once with the billing service's settings."""
    if config.stripe is None:
        raise ValueError("report_once needs Stripe settings")
    engine = db.create_pooled_engine(config.database_url, pool)
    channel = grpc.aio.secure_channel(
        config.auth_address, channel_credentials(config.server)
    )
    try:
        reporter = UsageReporter(
            BillingStore(db.session_factory(engine)),
            AccountsClient(accounts_pb2_grpc.AccountServiceStub(channel)),
            StripeGateway(config.stripe),
            config.usage_report,
            config.stripe.meter_event_name,
        )

        return await reporter.run_once()
    finally:
        await channel.close()
        await engine.dispose()


def main() -> int:
    configure_logging("usage-report")
    environment = Environment()
    try:
        config = BillingConfig.from_env(environment)
        pool = db.PoolSettings.from_env(environment, DEFAULT_POOL_SIZE)
    except ConfigError as error:
        log.error("usage_report.config_invalid", error=str(error))
        return 2
    if config.stripe is None:
        log.info("usage_report.skipped", reason="STRIPE_API_KEY is not set")
        return 0
    try:
        summary = asyncio.run(report_once(config, pool))
    except ConfigError as error:
        # The database URL weakens PGSSLMODE (db.check_sslmode).
        log.error("usage_report.config_invalid", error=str(error))
        return 2
    except (SQLAlchemyError, OSError) as error:
        log.error(
            "usage_report.run_failed",
            error=type(error).__name__,
            message=str(error)[:300],
        )
        return 1
    log.info("usage_report.finished", sent=summary.sent, failed=summary.failed)

    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
