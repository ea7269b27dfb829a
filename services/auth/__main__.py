"""Start the auth service: `python -m services.auth`."""

import asyncio
import gc
from dataclasses import dataclass

from arxio.auth.v1 import keys_pb2_grpc, operator_pb2_grpc
from arxio.internal.v1 import accounts_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from services.auth.admin import AccountServicer, KeyServicer, OperatorServicer
from services.auth.authorization import AuthorizationServicer
from services.auth.credential_cache import CredentialCache
from services.auth.decision import AuthDecider
from services.auth.ehr_config import EhrConfig, ehr_access
from services.auth.quota import QuotaCounter
from services.auth.store import AuthStore
from services.common import db
from services.common.config import ConfigError, Environment, ServerConfig
from services.common.server import Registration, run_service, serve


@dataclass(frozen=True)
class AuthConfig:
    server: ServerConfig
    database_url: str
    # SHA-256 of the operator credential; the token itself is not needed.
    operator_token_sha256: bytes
    # Client certificate names allowed to call the internal account API.
    account_peers: frozenset[str]
    # Seconds a credential may be served from memory; 0 disables the cache.
    cache_seconds: float

    @classmethod
    def from_env(cls, env: Environment) -> "AuthConfig":
        digest = env.text("ARXIO_OPERATOR_TOKEN_SHA256")
        try:
            operator_digest = bytes.fromhex(digest)
        except ValueError:
            operator_digest = b""
        if len(operator_digest) != 32:
            raise ConfigError(
                "ARXIO_OPERATOR_TOKEN_SHA256 is invalid: expected the "
                "64-character hex SHA-256 of the operator token"
            )

        return cls(
            server=ServerConfig.from_env(env, default_port=50051),
            database_url=env.text("DATABASE_URL"),
            operator_token_sha256=operator_digest,
            account_peers=env.names("ARXIO_ACCOUNT_PEERS", "billing"),
            cache_seconds=env.number(
                "ARXIO_AUTH_CACHE_SECONDS", 1.0, minimum=0
            ),
        )


async def main() -> None:
    config = AuthConfig.from_env(Environment())
    engine = db.create_pooled_engine(
        config.database_url, db.PoolSettings.from_env(Environment(), 10)
    )
    store = AuthStore(db.session_factory(engine))
    cache = CredentialCache(config.cache_seconds)
    ehr_tokens, ehr_registration = ehr_access(
        EhrConfig.from_env(Environment()), store, db.session_factory(engine)
    )
    quota = QuotaCounter(config.database_url)
    decider = AuthDecider(
        store,
        quota,
        config.operator_token_sha256,
        cache=cache,
        ehr_tokens=ehr_tokens,
    )
    stopping = asyncio.Event()
    listener = asyncio.create_task(cache.listen(config.database_url, stopping))

    async def stop() -> None:
        stopping.set()
        await listener
        await quota.close()
        await engine.dispose()

    registrations = [
        Registration(
            external_auth_pb2_grpc.add_AuthorizationServicer_to_server,
            AuthorizationServicer(decider),
            "envoy.service.auth.v3.Authorization",
        ),
        Registration(
            keys_pb2_grpc.add_KeyServiceServicer_to_server,
            KeyServicer(store),
            "arxio.auth.v1.KeyService",
        ),
        Registration(
            operator_pb2_grpc.add_OperatorServiceServicer_to_server,
            OperatorServicer(store),
            "arxio.auth.v1.OperatorService",
        ),
        Registration(
            accounts_pb2_grpc.add_AccountServiceServicer_to_server,
            AccountServicer(store),
            "arxio.internal.v1.AccountService",
            allowed_peers=config.account_peers,
        ),
        ehr_registration,
    ]
    # Modules, descriptors and the engine live as long as the process:
    # moved out of the collector's reach, they no longer make each full
    # collection walk them while checks wait.
    gc.freeze()
    await serve(
        "auth",
        config.server,
        registrations,
        check_ready=lambda: db.database_reachable(engine),
        on_stop=stop,
    )


if __name__ == "__main__":
    run_service("auth", main)
