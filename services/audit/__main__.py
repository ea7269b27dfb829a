"""Start the audit service: `python -m services.audit`."""

from dataclasses import dataclass

from arxio.audit.v1 import audit_pb2_grpc
from envoy.service.accesslog.v3 import als_pb2_grpc

from services.audit.servicers import AccessLogServicer, AuditServicer
from services.audit.store import AuditStore
from services.common import db
from services.common.config import Environment, ServerConfig
from services.common.server import Registration, run_service, serve


@dataclass(frozen=True)
class AuditConfig:
    server: ServerConfig
    database_url: str

    @classmethod
    def from_env(cls, env: Environment) -> "AuditConfig":
        return cls(
            server=ServerConfig.from_env(env, default_port=50053),
            database_url=env.text("DATABASE_URL"),
        )


async def main() -> None:
    config = AuditConfig.from_env(Environment())
    engine = db.create_engine(config.database_url)
    store = AuditStore(db.session_factory(engine))
    await serve(
        "audit",
        config.server,
        [
            Registration(
                als_pb2_grpc.add_AccessLogServiceServicer_to_server,
                AccessLogServicer(store),
                "envoy.service.accesslog.v3.AccessLogService",
            ),
            Registration(
                audit_pb2_grpc.add_AuditServiceServicer_to_server,
                AuditServicer(store),
                "arxio.audit.v1.AuditService",
            ),
        ],
        check_ready=lambda: db.database_reachable(engine),
        on_stop=engine.dispose,
    )


if __name__ == "__main__":
    run_service("audit", main)
