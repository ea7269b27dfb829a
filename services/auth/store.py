"""Queries of the auth schema: organizations, API keys, daily usage."""

import datetime
import ipaddress
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class OrganizationRow:
    org_id: str
    name: str
    plan: str
    state: str
    create_time: datetime.datetime
    ip_allowlist: tuple[str, ...]


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    org_id: str
    name: str
    scopes: tuple[str, ...]
    create_time: datetime.datetime
    # The expiry the key was created with; None for a key that never
    # expires on its own.
    expire_time: datetime.datetime | None
    revoke_time: datetime.datetime | None
    # The end of the grace period of a key rotated away; None until the
    # key is rotated.
    grace_end_time: datetime.datetime | None = None

    @property
    def end_time(self) -> datetime.datetime | None:
        """Return when the key stops working unless revoked first."""
        ends = [
            time
            for time in (self.expire_time, self.grace_end_time)
            if time is not None
        ]

        return min(ends, default=None)


@dataclass(frozen=True)
class Credential:
    """A key found by its hash, with what the auth decision needs."""

    key_id: str
    org_id: str
    scopes: frozenset[str]
    plan: str
    org_state: str
    ip_allowlist: tuple[IPNetwork, ...]
    # When the key stops working on its own, if ever.
    expire_time: datetime.datetime | None = None


_ORG_COLUMNS = (
    "org_id::text, name, plan, state, create_time, ip_allowlist::text[]"
)
_KEY_COLUMNS = (
    "key_id, org_id::text, name, scopes, create_time, expire_time,"
    " revoke_time, grace_end_time"
)
# Only Enterprise organizations have an IP allowlist: an UPDATE that sets
# `:plan` matches a row only if the new plan keeps that true.
_NEW_PLAN_ALLOWS_ALLOWLIST = (
    "(CAST(:plan AS text) = 'enterprise' OR cardinality(ip_allowlist) = 0)"
)


def _organization_row(row) -> OrganizationRow:
    return OrganizationRow(*row[:5], ip_allowlist=tuple(row[5]))


def _key_row(row) -> KeyRow:
    return KeyRow(
        key_id=row[0],
        org_id=row[1],
        name=row[2],
        scopes=tuple(row[3]),
        create_time=row[4],
        expire_time=row[5],
        revoke_time=row[6],
        grace_end_time=row[7],
    )


class AuthStore:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def find_credential(self, digest: bytes) -> Credential | None:
        """Find a usable key by its SHA-256 hash: not revoked or expired."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT k.key_id, k.org_id::text, k.scopes, o.plan,"
                        " o.state, o.ip_allowlist::text[],"
                        " LEAST(k.expire_time, k.grace_end_time)"
                        " FROM auth.api_keys k"
                        " JOIN auth.organizations o USING (org_id)"
                        " WHERE k.key_sha256 = :digest"
                        " AND k.revoke_time IS NULL"
                        " AND COALESCE(LEAST(k.expire_time, k.grace_end_time),"
                        " 'infinity') > now()"
                    ),
                    {"digest": digest},
                )
            ).first()
        if row is None:
            return None

        return Credential(
            key_id=row[0],
            org_id=row[1],
            scopes=frozenset(row[2]),
            plan=row[3],
            org_state=row[4],
            ip_allowlist=tuple(ipaddress.ip_network(cidr) for cidr in row[5]),
            expire_time=row[6],
        )

    async def create_organization(
        self, name: str, plan: str
    ) -> OrganizationRow:
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        "INSERT INTO auth.organizations (org_id, name, plan)"
                        " VALUES (:org_id, :name, :plan)"
                        f" RETURNING {_ORG_COLUMNS}"
                    ),
                    {"org_id": uuid.uuid4(), "name": name, "plan": plan},
                )
            ).one()

        return _organization_row(row)

    async def get_organization(self, org_id: str) -> OrganizationRow | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    text(
                        f"SELECT {_ORG_COLUMNS} FROM auth.organizations"
                        " WHERE org_id = :org_id"
                    ),
                    {"org_id": org_id},
                )
            ).first()

        return None if row is None else _organization_row(row)

    async def set_state(
        self, org_id: str, state: str
    ) -> OrganizationRow | None:
        """Set an organization's state, active or suspended."""
        return await self._update_organization(
            "state = :state", {"org_id": org_id, "state": state}
        )

    async def set_plan(
        self, org_id: str, plan: str
    ) -> tuple[OrganizationRow | None, bool]:
        """Set the plan unless the organization keeps an IP allowlist.

        Only Enterprise organizations have an allowlist, so any other plan
        is set only once the allowlist is empty. Return the row as it is
        after the statement, or None when the organization does not exist,
        and whether the plan was set. One statement, so a concurrent
        allowlist change cannot slip in between check and update.
        """
        row = await self._update_organization(
            "plan = :plan",
            {"org_id": org_id, "plan": plan},
            condition=_NEW_PLAN_ALLOWS_ALLOWLIST,
        )
        if row is not None:
            return row, True

        return await self.get_organization(org_id), False

    async def set_ip_allowlist(
        self, org_id: str, ranges: list[str]
    ) -> tuple[OrganizationRow | None, bool]:
        """Replace the IP allowlist if it is empty or the plan is Enterprise.

        Return the row as it is after the statement, or None when the
        organization does not exist, and whether the allowlist was set.
        """
        row = await self._update_organization(
            "ip_allowlist = CAST(:ranges AS cidr[])",
            {"org_id": org_id, "ranges": ranges},
            condition="(plan = 'enterprise'"
            " OR cardinality(CAST(:ranges AS cidr[])) = 0)",
        )
        if row is not None:
            return row, True

        return await self.get_organization(org_id), False

    async def _update_organization(
        self, assignment: str, parameters: dict, condition: str = "TRUE"
    ) -> OrganizationRow | None:
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        f"UPDATE auth.organizations SET {assignment}"
                        f" WHERE org_id = :org_id AND {condition}"
                        f" RETURNING {_ORG_COLUMNS}"
                    ),
                    parameters,
                )
            ).first()

        return None if row is None else _organization_row(row)

    async def set_plan_if_current(
        self, org_id: str, plan: str, current_plans: list[str]
    ) -> tuple[OrganizationRow | None, bool]:
        """Set the plan while the current one is in `current_plans`.

        An empty `current_plans` allows any. As in `set_plan`, a plan other
        than Enterprise is not set while the organization has an IP
        allowlist. Return the row as it is after the statement, or None
        when the organization does not exist, and whether the plan changed.
        One statement, so a concurrent operator change cannot be
        overwritten.
        """
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        "UPDATE auth.organizations SET plan = :plan"
                        " WHERE org_id = :org_id AND plan <> :plan"
                        " AND (cardinality(CAST(:current AS text[])) = 0"
                        " OR plan = ANY(CAST(:current AS text[])))"
                        f" AND {_NEW_PLAN_ALLOWS_ALLOWLIST}"
                        f" RETURNING {_ORG_COLUMNS}"
                    ),
                    {
                        "org_id": org_id,
                        "plan": plan,
                        "current": current_plans,
                    },
                )
            ).first()
        if row is not None:
            return _organization_row(row), True

        return await self.get_organization(org_id), False

    async def list_organizations(
        self, limit: int, after: tuple[datetime.datetime, str] | None
    ) -> list[OrganizationRow]:
        where = ""
        parameters: dict = {"limit": limit}
        if after is not None:
            where = " WHERE (create_time, org_id) > (:time, :after_id)"
            parameters |= {"time": after[0], "after_id": after[1]}
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    f"SELECT {_ORG_COLUMNS} FROM auth.organizations{where}"
                    " ORDER BY create_time, org_id LIMIT :limit"
                ),
                parameters,
            )

            return [_organization_row(row) for row in rows]

    async def insert_key(
        self,
        key_id: str,
        org_id: str,
        name: str,
        digest: bytes,
        scopes: list[str],
        expire_time: datetime.datetime | None,
    ) -> KeyRow:
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        "INSERT INTO auth.api_keys (key_id, org_id, name,"
                        " key_sha256, scopes, expire_time) VALUES (:key_id,"
                        " :org_id, :name, :digest, :scopes, :expire_time)"
                        f" RETURNING {_KEY_COLUMNS}"
                    ),
                    {
                        "key_id": key_id,
                        "org_id": org_id,
                        "name": name,
                        "digest": digest,
                        "scopes": scopes,
                        "expire_time": expire_time,
                    },
                )
            ).one()

        return _key_row(row)

    async def list_keys(
        self,
        org_id: str,
        limit: int,
        after: tuple[datetime.datetime, str] | None,
    ) -> list[KeyRow]:
        where = "org_id = :org_id"
        parameters: dict = {"org_id": org_id, "limit": limit}
        if after is not None:
            where += " AND (create_time, key_id) > (:time, :after_id)"
            parameters |= {"time": after[0], "after_id": after[1]}
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    f"SELECT {_KEY_COLUMNS} FROM auth.api_keys WHERE {where}"
                    " ORDER BY create_time, key_id LIMIT :limit"
                ),
                parameters,
            )

            return [_key_row(row) for row in rows]

    async def get_key(self, org_id: str, key_id: str) -> KeyRow | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    text(
                        f"SELECT {_KEY_COLUMNS} FROM auth.api_keys"
                        " WHERE org_id = :org_id AND key_id = :key_id"
                    ),
                    {"org_id": org_id, "key_id": key_id},
                )
            ).first()

        return None if row is None else _key_row(row)

    async def end_grace_at(
        self, org_id: str, key_id: str, grace_end_time: datetime.datetime
    ) -> KeyRow | None:
        """Stop a rotated key at `grace_end_time`, or earlier if already set.

        The key's own `expire_time` stays as created, so a replacement made
        later can copy it.
        """
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        "UPDATE auth.api_keys SET grace_end_time ="
                        " LEAST(COALESCE(grace_end_time, :time), :time)"
                        " WHERE org_id = :org_id AND key_id = :key_id"
                        f" AND revoke_time IS NULL RETURNING {_KEY_COLUMNS}"
                    ),
                    {
                        "org_id": org_id,
                        "key_id": key_id,
                        "time": grace_end_time,
                    },
                )
            ).first()

        return None if row is None else _key_row(row)

    async def revoke_key(self, org_id: str, key_id: str) -> KeyRow | None:
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    text(
                        "UPDATE auth.api_keys"
                        " SET revoke_time = COALESCE(revoke_time, now())"
                        " WHERE org_id = :org_id AND key_id = :key_id"
                        f" RETURNING {_KEY_COLUMNS}"
                    ),
                    {"org_id": org_id, "key_id": key_id},
                )
            ).first()

        return None if row is None else _key_row(row)

    async def list_daily_usage(
        self, org_id: str, start: datetime.date, end: datetime.date
    ) -> list[tuple[datetime.date, int]]:
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    "SELECT day, request_count FROM auth.daily_usage"
                    " WHERE org_id = :org_id AND day BETWEEN :start AND :end"
                    " ORDER BY day"
                ),
                {"org_id": org_id, "start": start, "end": end},
            )

            return [(row[0], row[1]) for row in rows]
