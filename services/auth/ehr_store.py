"""Queries of registered EHR issuers, used JWT ids and CDS Hooks settings."""

import datetime
import ipaddress
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from services.auth.store import Credential


@dataclass(frozen=True)
class EhrIssuerRow:
    issuer_id: str
    org_id: str
    issuer: str
    jwks_url: str
    create_time: datetime.datetime


@dataclass(frozen=True)
class TrustedIssuer:
    """A registered issuer with what the auth decision needs of its org."""

    issuer_id: str
    jwks_url: str
    # The organization as a credential with only the hooks' scope.
    credential: Credential


class IssuerTaken(Exception):
    """Another registration already has this issuer."""


_ISSUER_COLUMNS = (
    "issuer_id::text, org_id::text, issuer, jwks_url, create_time"
)


class EhrStore:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def insert_issuer(
        self, org_id: str, issuer: str, jwks_url: str
    ) -> EhrIssuerRow:
        """Register an issuer; raise IssuerTaken if it exists already."""
        try:
            async with self._sessions.begin() as session:
                row = (
                    await session.execute(
                        text(
                            "INSERT INTO auth.ehr_issuers (issuer_id, org_id,"
                            " issuer, jwks_url) VALUES (:issuer_id, :org_id,"
                            f" :issuer, :jwks_url) RETURNING {_ISSUER_COLUMNS}"
                        ),
                        {
                            "issuer_id": uuid.uuid4(),
                            "org_id": org_id,
                            "issuer": issuer,
                            "jwks_url": jwks_url,
                        },
                    )
                ).one()
        except IntegrityError:
            raise IssuerTaken(issuer) from None

        return EhrIssuerRow(*row)

    async def list_issuers(self, org_id: str) -> list[EhrIssuerRow]:
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    f"SELECT {_ISSUER_COLUMNS} FROM auth.ehr_issuers"
                    " WHERE org_id = :org_id ORDER BY create_time, issuer_id"
                ),
                {"org_id": org_id},
            )

            return [EhrIssuerRow(*row) for row in rows]

    async def delete_issuer(
        self, org_id: str, issuer_id: str
    ) -> EhrIssuerRow | None:
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        "DELETE FROM auth.ehr_issuers WHERE org_id = :org_id"
                        " AND issuer_id = :issuer_id"
                        f" RETURNING {_ISSUER_COLUMNS}"
                    ),
                    {"org_id": org_id, "issuer_id": issuer_id},
                )
            ).first()

        return None if row is None else EhrIssuerRow(*row)

    async def find_issuer(self, issuer: str) -> TrustedIssuer | None:
        """Find a registered issuer and its organization's access facts."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT e.issuer_id::text, e.jwks_url,"
                        " o.org_id::text, o.plan, o.state,"
                        " o.ip_allowlist::text[] FROM auth.ehr_issuers e"
                        " JOIN auth.organizations o USING (org_id)"
                        " WHERE e.issuer = :issuer"
                    ),
                    {"issuer": issuer},
                )
            ).first()
        if row is None:
            return None

        return TrustedIssuer(
            issuer_id=row[0],
            jwks_url=row[1],
            credential=Credential(
                # Audit entries name the issuer registration as the key.
                key_id=f"ehr_{row[0]}",
                org_id=row[2],
                scopes=frozenset({"CLINICAL_REVIEW"}),
                plan=row[3],
                org_state=row[4],
                ip_allowlist=tuple(
                    ipaddress.ip_network(cidr) for cidr in row[5]
                ),
            ),
        )

    async def use_token_id(
        self, issuer: str, jti: str, expire_time: datetime.datetime
    ) -> bool:
        """Record a JWT id; return False when it was already used.

        Expired ids are dropped in the same transaction, so the table
        holds only ids whose tokens could still be presented.
        """
        async with self._sessions.begin() as session:
            await session.execute(
                text(
                    "DELETE FROM auth.ehr_token_ids"
                    " WHERE expire_time < now() - interval '5 minutes'"
                )
            )
            row = (
                await session.execute(
                    text(
                        "INSERT INTO auth.ehr_token_ids (issuer, jti,"
                        " expire_time) VALUES (:issuer, :jti, :expire_time)"
                        " ON CONFLICT DO NOTHING RETURNING jti"
                    ),
                    {"issuer": issuer, "jti": jti, "expire_time": expire_time},
                )
            ).first()

        return row is not None

    async def model_review_timeout_ms(self, org_id: str) -> int:
        """Return the org's hook model deadline in milliseconds, or 0."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT model_review_timeout_ms"
                        " FROM auth.cds_hooks_settings WHERE org_id = :org_id"
                    ),
                    {"org_id": org_id},
                )
            ).first()

        return 0 if row is None or row[0] is None else row[0]

    async def set_model_review_timeout_ms(
        self, org_id: str, timeout_ms: int | None
    ) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                text(
                    "INSERT INTO auth.cds_hooks_settings"
                    " (org_id, model_review_timeout_ms)"
                    " VALUES (:org_id, :timeout_ms)"
                    " ON CONFLICT (org_id) DO UPDATE SET"
                    " model_review_timeout_ms = :timeout_ms,"
                    " update_time = now()"
                ),
                {"org_id": org_id, "timeout_ms": timeout_ms},
            )
