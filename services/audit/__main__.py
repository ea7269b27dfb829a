"""Start the audit service: `python -m services.audit`.

It serves the audit query API and signs checkpoints of every chain; the
ingester (`python -m services.audit.ingest`) writes the entries.
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path

from arxio.audit.v1 import audit_pb2_grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from services.audit import chain
from services.audit.anchors import AnchorFile
from services.audit.checkpoints import Checkpointer
from services.audit.servicers import AuditOperatorServicer, AuditServicer
from services.audit.store import AuditStore
from services.common import db
from services.common.config import ConfigError, Environment, ServerConfig
from services.common.server import Registration, run_service, serve


def _read_key(name: str, path: Path, load):
    try:
        return load(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{name}={str(path)!r} is not an Ed25519 PEM key: {error}"
        ) from None


@dataclass(frozen=True)
class AuditConfig:
    server: ServerConfig
    database_url: str
    signing_key: Ed25519PrivateKey
    # Every key whose checkpoints verify: the signing key's own public key
    # and earlier ones, after a key rotation.
    trusted_keys: dict[str, Ed25519PublicKey]
    checkpoint_seconds: float
    # The append-only file of each chain's newest checkpoint, on storage
    # that outlives the process and that a database superuser cannot write.
    anchor_file: Path
    # Trust the database's checkpoints when the anchor file is empty, for
    # one start after a lost volume or a database restore.
    anchor_adopt: bool
    # Whole months that the retention job keeps. Verification rejects a
    # retention cut at a month within them.
    retention_months: int

    @classmethod
    def from_env(cls, env: Environment) -> "AuditConfig":
        signing_key = _read_key(
            "ARXIO_AUDIT_SIGNING_KEY",
            env.file("ARXIO_AUDIT_SIGNING_KEY"),
            chain.load_private_key,
        )
        public_keys = [signing_key.public_key()]
        for path in env.text("ARXIO_AUDIT_TRUSTED_KEYS", "").split(","):
            if path.strip():
                public_keys.append(
                    _read_key(
                        "ARXIO_AUDIT_TRUSTED_KEYS",
                        Path(path.strip()),
                        chain.load_public_key,
                    )
                )

        return cls(
            server=ServerConfig.from_env(env, default_port=50053),
            database_url=env.text("DATABASE_URL"),
            signing_key=signing_key,
            trusted_keys={
                chain.public_key_id(key): key for key in public_keys
            },
            checkpoint_seconds=env.number(
                "ARXIO_AUDIT_CHECKPOINT_SECONDS", 60.0, minimum=0.1
            ),
            anchor_file=Path(env.text("ARXIO_AUDIT_ANCHOR_FILE")),
            anchor_adopt=env.boolean("ARXIO_AUDIT_ANCHOR_ADOPT", False),
            retention_months=env.integer(
                "ARXIO_AUDIT_RETENTION_MONTHS",
                chain.DEFAULT_RETENTION_MONTHS,
                minimum=1,
                maximum=chain.MAX_RETENTION_MONTHS,
            ),
        )


async def main() -> None:
    config = AuditConfig.from_env(Environment())
    engine = db.create_pooled_engine(
        config.database_url, db.PoolSettings.from_env(Environment(), 10)
    )
    store = AuditStore(db.session_factory(engine))
    checkpointer = Checkpointer(
        store,
        config.signing_key,
        config.trusted_keys,
        anchor_file=AnchorFile(config.anchor_file),
        adopt_database=config.anchor_adopt,
    )
    stopping = asyncio.Event()
    signing = asyncio.create_task(
        checkpointer.run(config.checkpoint_seconds, stopping)
    )

    async def stop() -> None:
        stopping.set()
        await signing
        await engine.dispose()

    await serve(
        "audit",
        config.server,
        [
            Registration(
                audit_pb2_grpc.add_AuditServiceServicer_to_server,
                AuditServicer(
                    store,
                    config.trusted_keys,
                    config.retention_months,
                    checkpointer,
                ),
                "arxio.audit.v1.AuditService",
            ),
            Registration(
                audit_pb2_grpc.add_AuditOperatorServiceServicer_to_server,
                AuditOperatorServicer(
                    store,
                    config.trusted_keys,
                    config.retention_months,
                    checkpointer,
                ),
                "arxio.audit.v1.AuditOperatorService",
            ),
        ],
        check_ready=lambda: db.database_reachable(engine),
        on_stop=stop,
    )


if __name__ == "__main__":
    run_service("audit", main)
