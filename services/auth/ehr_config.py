"""Settings and wiring of CDS Hooks JWT authentication in the auth service."""

import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from arxio.auth.v1 import ehr_pb2_grpc
from sqlalchemy.ext.asyncio import async_sessionmaker

from services.auth.ehr_admin import EhrAccessServicer
from services.auth.ehr_store import EhrStore
from services.auth.ehr_tokens import EhrTokenVerifier, JwksCache
from services.auth.store import AuthStore
from services.common.config import ConfigError, Environment
from services.common.server import Registration


@dataclass(frozen=True)
class EhrConfig:
    # Public https base URL of the edge, as EHRs call it and name it in a
    # JWT's `aud`; None turns JWT authentication off.
    base_url: str | None
    # Extra CA certificates to trust for JWK Set URLs, beside the system's.
    jwks_ca_file: Path | None

    @classmethod
    def from_env(cls, env: Environment) -> "EhrConfig":
        base_url = env.optional("ARXIO_CDS_HOOKS_BASE_URL")
        if base_url is not None:
            parts = urllib.parse.urlsplit(base_url)
            if parts.scheme != "https" or not parts.hostname or parts.query:
                raise ConfigError(
                    f"ARXIO_CDS_HOOKS_BASE_URL={base_url!r} is invalid: "
                    "expected the edge's public https URL, such as "
                    "https://cds.example.org"
                )
            base_url = base_url.rstrip("/")
        ca_file = None
        if env.optional("ARXIO_JWKS_CA_FILE"):
            ca_file = env.file("ARXIO_JWKS_CA_FILE")

        return cls(base_url=base_url, jwks_ca_file=ca_file)


def ehr_access(
    config: EhrConfig, store: AuthStore, sessions: async_sessionmaker
) -> tuple[EhrTokenVerifier, Registration]:
    """Build the JWT verifier and the operator API of EHR issuers.

    Without a base URL the verifier rejects every token, but it still
    reads each organization's CDS Hooks settings for API-key calls.
    """
    ehr_store = EhrStore(sessions)
    context = ssl.create_default_context()
    if config.jwks_ca_file is not None:
        context.load_verify_locations(cafile=str(config.jwks_ca_file))
    verifier = EhrTokenVerifier(ehr_store, JwksCache(context), config.base_url)
    registration = Registration(
        ehr_pb2_grpc.add_EhrAccessServiceServicer_to_server,
        EhrAccessServicer(store, ehr_store),
        "arxio.auth.v1.EhrAccessService",
    )

    return verifier, registration
