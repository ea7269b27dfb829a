"""Writes to and reads of the append-only audit table."""

import dataclasses
import datetime
from collections.abc import Sequence

import psycopg
import structlog
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from services.audit.entries import AuditRow

log = structlog.get_logger()

_COLUMNS = (
    "event_id, time, org_id, key_id, action, resource_type, method,"
    " endpoint, status_code, grpc_status, response_time_ms, request_id,"
    " client_address"
)
_INSERT = text(
    f"INSERT INTO audit.audit_events ({_COLUMNS}) VALUES (:event_id, :time,"
    " :org_id, :key_id, :action, :resource_type, :method, :endpoint,"
    " :status_code, :grpc_status, :response_time_ms, :request_id,"
    " :client_address)"
)
_REQUEST_ID_CONSTRAINT = "audit_events_request_id_key"


def _is_duplicate_request_id(error: IntegrityError) -> bool:
    diagnostic = getattr(error.orig, "diag", None)

    return (
        isinstance(error.orig, psycopg.errors.UniqueViolation)
        and diagnostic is not None
        and diagnostic.constraint_name == _REQUEST_ID_CONSTRAINT
    )


class AuditStore:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def insert(self, rows: Sequence[AuditRow]) -> None:
        """Insert rows in one transaction; a known request id is skipped.

        ON CONFLICT DO NOTHING would be simpler, but under row-level
        security PostgreSQL checks it against the SELECT policy, which
        lets the service's role see no rows outside a query for one org.
        """
        if not rows:
            return
        values = [dataclasses.asdict(row) for row in rows]
        try:
            async with self._sessions.begin() as session:
                await session.execute(_INSERT, values)
        except IntegrityError as error:
            if not _is_duplicate_request_id(error):
                raise
            await self._insert_skipping_duplicates(values)

    async def _insert_skipping_duplicates(self, values: list[dict]) -> None:
        skipped = 0
        async with self._sessions.begin() as session:
            for value in values:
                try:
                    async with session.begin_nested():
                        await session.execute(_INSERT, value)
                except IntegrityError as error:
                    if not _is_duplicate_request_id(error):
                        raise
                    skipped += 1
        log.info("audit.duplicates_skipped", rows=skipped)

    async def list_events(
        self,
        org_id: str,
        limit: int,
        before: tuple[datetime.datetime, str] | None,
        action: str,
    ) -> list[AuditRow]:
        """List an organization's rows, newest first.

        Row-level security limits the query to `org_id` as well, so a
        mistake in the WHERE clause cannot show another organization's rows.
        """
        where = "org_id = :org_id"
        parameters: dict = {"org_id": org_id, "limit": limit}
        if before is not None:
            where += " AND (time, event_id) < (:time, :event_id)"
            parameters |= {"time": before[0], "event_id": before[1]}
        if action:
            where += " AND action = :action"
            parameters["action"] = action
        async with self._sessions.begin() as session:
            await session.execute(
                text("SELECT set_config('arxio.org_id', :org_id, true)"),
                {"org_id": org_id},
            )
            rows = await session.execute(
                text(
                    f"SELECT {_COLUMNS} FROM audit.audit_events"
                    f" WHERE {where} ORDER BY time DESC, event_id DESC"
                    " LIMIT :limit"
                ),
                parameters,
            )

            return [
                AuditRow(
                    row[0],
                    row[1],
                    str(row[2]) if row[2] is not None else None,
                    *row[3:],
                )
                for row in rows
            ]
