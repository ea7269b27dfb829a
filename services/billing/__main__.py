"""Start the billing service: `python -m services.billing`."""

import asyncio

import grpc
import structlog
from arxio.billing.v1 import billing_pb2_grpc
from arxio.internal.v1 import accounts_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.billing.accounts import AccountsClient
from services.billing.config import BillingConfig
from services.billing.events import EventProcessor
from services.billing.servicers import BillingServicer
from services.billing.store import BillingStore
from services.billing.stripe_gateway import StripeGateway
from services.billing.usage_reports import UsageReporter
from services.common import db
from services.common.config import Environment
from services.common.server import (
    Registration,
    channel_credentials,
    run_service,
    serve,
)

log = structlog.get_logger()


async def main() -> None:
    config = BillingConfig.from_env(Environment())
    engine = db.create_pooled_engine(
        config.database_url, db.PoolSettings.from_env(Environment(), 10)
    )
    billing_store = BillingStore(db.session_factory(engine))
    channel = grpc.aio.secure_channel(
        config.auth_address, channel_credentials(config.server)
    )
    health_stub = health_pb2_grpc.HealthStub(channel)
    accounts = AccountsClient(accounts_pb2_grpc.AccountServiceStub(channel))
    gateway = None
    pro_price_id = None
    if config.stripe is not None:
        gateway = StripeGateway(config.stripe)
        pro_price_id = config.stripe.pro_price_id
    log.info(
        "billing.configured",
        stripe_calls=gateway is not None,
        webhooks=config.webhook_secret is not None,
    )

    stopping = asyncio.Event()
    reporting = None
    if gateway is not None and config.usage_report.interval == 0:
        log.info("usage_report.loop_off", reason="interval is 0")
    elif gateway is not None:
        reporter = UsageReporter(
            billing_store,
            accounts,
            gateway,
            config.usage_report,
            config.stripe.meter_event_name,
        )
        reporting = asyncio.create_task(reporter.run_forever(stopping))

    async def ready() -> bool:
        reply = await health_stub.Check(
            health_pb2.HealthCheckRequest(
                service="arxio.internal.v1.AccountService"
            ),
            timeout=2,
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return False

        return await db.database_reachable(engine)

    async def stop() -> None:
        stopping.set()
        if reporting is not None:
            await reporting
        await channel.close()
        await engine.dispose()

    await serve(
        "billing",
        config.server,
        [
            Registration(
                billing_pb2_grpc.add_BillingServiceServicer_to_server,
                BillingServicer(
                    accounts,
                    billing_store,
                    EventProcessor(billing_store, accounts, pro_price_id),
                    gateway,
                    config.webhook_secret,
                    config.webhook_tolerance,
                ),
                "arxio.billing.v1.BillingService",
            )
        ],
        check_ready=ready,
        on_stop=stop,
    )


if __name__ == "__main__":
    run_service("billing", main)
