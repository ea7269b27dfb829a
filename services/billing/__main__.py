"""Start the billing service: `python -m services.billing`."""

from dataclasses import dataclass

import grpc
from arxio.billing.v1 import billing_pb2_grpc
from arxio.internal.v1 import accounts_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.billing.servicers import BillingServicer
from services.common.config import Environment, ServerConfig
from services.common.server import (
    Registration,
    channel_credentials,
    run_service,
    serve,
)


@dataclass(frozen=True)
class BillingConfig:
    server: ServerConfig
    # host:port of the auth service, whose certificate must name that host.
    auth_address: str

    @classmethod
    def from_env(cls, env: Environment) -> "BillingConfig":
        return cls(
            server=ServerConfig.from_env(env, default_port=50054),
            auth_address=env.text("ARXIO_AUTH_ADDRESS", "127.0.0.1:50051"),
        )


async def main() -> None:
    config = BillingConfig.from_env(Environment())
    channel = grpc.aio.secure_channel(
        config.auth_address, channel_credentials(config.server)
    )
    health_stub = health_pb2_grpc.HealthStub(channel)

    async def auth_serving() -> bool:
        reply = await health_stub.Check(
            health_pb2.HealthCheckRequest(
                service="arxio.internal.v1.AccountService"
            ),
            timeout=2,
        )

        return reply.status == health_pb2.HealthCheckResponse.SERVING

    await serve(
        "billing",
        config.server,
        [
            Registration(
                billing_pb2_grpc.add_BillingServiceServicer_to_server,
                BillingServicer(accounts_pb2_grpc.AccountServiceStub(channel)),
                "arxio.billing.v1.BillingService",
            )
        ],
        check_ready=auth_serving,
        on_stop=channel.close,
    )


if __name__ == "__main__":
    run_service("billing", main)
