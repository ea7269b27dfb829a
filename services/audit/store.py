"""Reads of the audit trail, and the checkpoints the service signs.

Every read runs in a transaction that names one organization's chain
(`arxio.org_id` or `arxio.chain_id`), so PostgreSQL's row-level security
limits it to that chain even if a WHERE clause were wrong. Rows are only
ever inserted: by the ingester, and here, checkpoints.
"""

import datetime
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit import chain

_ENTRY_COLUMNS = (
    "event_id, time, chain_id, seq, org_id::text, key_id, action,"
    " resource_type, method, endpoint, status_code, grpc_status,"
    " response_time_ms, request_id, client_address, prev_hash, hash"
)
_CHECKPOINT_COLUMNS = (
    "chain_id, seq, hash, month_end, issue_time, public_key_id, signature"
)
# Rows fetched per round trip when a whole chain is read.
_CHUNK = 5000


@dataclass(frozen=True)
class EventFilter:
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    action: str = ""
    status_code: int = 0
    key_id: str = ""


def _entry(row) -> chain.Entry:
    return chain.Entry(
        *row[:15], prev_hash=bytes(row[15]), hash=bytes(row[16])
    )


def _checkpoint(row) -> chain.Checkpoint:
    return chain.Checkpoint(
        chain_id=row[0],
        seq=row[1],
        hash=bytes(row[2]),
        month_end=row[3],
        issue_time=row[4],
        public_key_id=row[5],
        signature=bytes(row[6]),
    )


async def _scope_to_org(session: AsyncSession, org_id: str) -> None:
    await session.execute(
        text("SELECT set_config('arxio.org_id', :org_id, true)"),
        {"org_id": org_id},
    )


async def _scope_to_chain(session: AsyncSession, chain_id: uuid.UUID) -> None:
    await session.execute(
        text("SELECT set_config('arxio.chain_id', :chain_id, true)"),
        {"chain_id": str(chain_id)},
    )


class AuditStore:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def list_events(
        self,
        org_id: str,
        limit: int,
        before: tuple[datetime.datetime, str] | None,
        filters: EventFilter,
    ) -> list[chain.Entry]:
        """List an organization's entries, newest first."""
        where = ["org_id = :org_id"]
        parameters: dict = {"org_id": org_id, "limit": limit}
        if before is not None:
            where.append("(time, event_id) < (:before_time, :before_id)")
            parameters |= {"before_time": before[0], "before_id": before[1]}
        if filters.start_time is not None:
            where.append("time >= :start_time")
            parameters["start_time"] = filters.start_time
        if filters.end_time is not None:
            where.append("time < :end_time")
            parameters["end_time"] = filters.end_time
        if filters.action:
            where.append("action = :action")
            parameters["action"] = filters.action
        if filters.status_code:
            where.append("status_code = :status_code")
            parameters["status_code"] = filters.status_code
        if filters.key_id:
            where.append("key_id = :key_id")
            parameters["key_id"] = filters.key_id
        async with self._sessions.begin() as session:
            await _scope_to_org(session, org_id)
            rows = await session.execute(
                text(
                    f"SELECT {_ENTRY_COLUMNS} FROM audit.events WHERE "
                    + " AND ".join(where)
                    + " ORDER BY time DESC, event_id DESC LIMIT :limit"
                ),
                parameters,
            )

            return [_entry(row) for row in rows]

    async def get_event(
        self, org_id: str, event_id: uuid.UUID
    ) -> chain.Entry | None:
        async with self._sessions.begin() as session:
            await _scope_to_org(session, org_id)
            row = (
                await session.execute(
                    text(
                        f"SELECT {_ENTRY_COLUMNS} FROM audit.events"
                        " WHERE org_id = :org_id AND event_id = :event_id"
                    ),
                    {"org_id": org_id, "event_id": event_id},
                )
            ).first()

        return None if row is None else _entry(row)

    async def chain_entries(
        self, chain_id: uuid.UUID, after_seq: int = 0
    ) -> AsyncIterator[chain.Entry]:
        """Yield a chain's entries after `after_seq`, in chain order.

        Rows that share a seq come one after the other, ordered by time
        and event id. The insert triggers reject such rows, but a superuser
        can add them in replica mode, and so can the owner role after it
        disables a trigger or attaches a filled table as a partition.
        """
        where = "seq > :after"
        parameters: dict = {"chain": chain_id, "after": after_seq}
        while True:
            async with self._sessions.begin() as session:
                await _scope_to_chain(session, chain_id)
                rows = (
                    await session.execute(
                        text(
                            f"SELECT {_ENTRY_COLUMNS} FROM audit.events"
                            f" WHERE chain_id = :chain AND {where}"
                            " ORDER BY seq, time, event_id LIMIT :limit"
                        ),
                        parameters | {"limit": _CHUNK},
                    )
                ).all()
            for row in rows:
                yield _entry(row)
            if len(rows) < _CHUNK:
                return
            # The next page starts after the last row, not after its seq,
            # so that a page boundary never skips a row with the same seq.
            where = (
                "seq >= :seq AND (seq, time, event_id)"
                " > (:seq, :time, :event_id)"
            )
            last = _entry(rows[-1])
            parameters = {
                "chain": chain_id,
                "seq": last.seq,
                "time": last.time,
                "event_id": last.event_id,
            }

    async def checkpoints(self, chain_id: uuid.UUID) -> list[chain.Checkpoint]:
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints"
                    " WHERE chain_id = :chain ORDER BY seq"
                ),
                {"chain": chain_id},
            )

            return [_checkpoint(row) for row in rows]

    async def checkpoints_at(
        self, chain_id: uuid.UUID, seqs: list[int]
    ) -> list[chain.Checkpoint]:
        """Return a chain's checkpoints at the given sequence numbers."""
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints"
                    " WHERE chain_id = :chain AND seq = ANY(:seqs)"
                    " ORDER BY seq"
                ),
                {"chain": chain_id, "seqs": seqs},
            )

            return [_checkpoint(row) for row in rows]

    async def nearest_checkpoints(
        self, chain_id: uuid.UUID, seq: int
    ) -> tuple[chain.Checkpoint | None, chain.Checkpoint | None]:
        """Return the newest checkpoint below `seq` and the oldest one at
        or above it; None where there is none."""
        async with self._sessions() as session:
            below = (
                await session.execute(
                    text(
                        f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints"
                        " WHERE chain_id = :chain AND seq < :seq"
                        " ORDER BY seq DESC LIMIT 1"
                    ),
                    {"chain": chain_id, "seq": seq},
                )
            ).first()
            above = (
                await session.execute(
                    text(
                        f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints"
                        " WHERE chain_id = :chain AND seq >= :seq"
                        " ORDER BY seq LIMIT 1"
                    ),
                    {"chain": chain_id, "seq": seq},
                )
            ).first()

        return (
            None if below is None else _checkpoint(below),
            None if above is None else _checkpoint(above),
        )

    async def partition_months(self) -> list[datetime.date]:
        """Return the first day of each month that has a partition."""
        async with self._sessions() as session:
            rows = await session.execute(
                text("SELECT audit.partition_months()")
            )

            return [row[0] for row in rows]

    async def last_removed_seq(self, chain_id: uuid.UUID) -> int:
        async with self._sessions() as session:
            value = (
                await session.execute(
                    text(
                        "SELECT max(last_removed_seq) FROM"
                        " audit.retention_cuts WHERE chain_id = :chain"
                    ),
                    {"chain": chain_id},
                )
            ).scalar()

        return value or 0

    async def entries_stored_before(self, moment: datetime.datetime) -> bool:
        """Tell whether any entry was stored before `moment`."""
        async with self._sessions() as session:
            return bool(
                await session.scalar(
                    text("SELECT audit.entries_stored_before(:moment)"),
                    {"moment": moment},
                )
            )

    async def chain_heads(self) -> list[tuple[uuid.UUID, int, bytes, int]]:
        """Return each chain's head and its newest checkpoint's seq."""
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    "SELECT chain_id, seq, hash, checkpoint_seq"
                    " FROM audit.chain_heads()"
                )
            )

            return [
                (row[0], row[1], bytes(row[2]), row[3] or 0) for row in rows
            ]

    async def month_ends_to_sign(
        self, month_start: datetime.date
    ) -> list[tuple[uuid.UUID, int, bytes]]:
        """Return each chain's last entry filed before `month_start` that
        has no month-end checkpoint yet."""
        async with self._sessions() as session:
            rows = await session.execute(
                text(
                    "SELECT chain_id, seq, hash FROM"
                    " audit.month_end_heads(:month_start)"
                ),
                {"month_start": month_start},
            )

            return [(row[0], row[1], bytes(row[2])) for row in rows]

    async def insert_checkpoint(self, point: chain.Checkpoint) -> bool:
        """Insert a checkpoint; return False when the chain has one of the
        same kind at that seq already, such as another replica's."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                text(
                    "INSERT INTO audit.checkpoints (chain_id, seq, hash,"
                    " month_end, issue_time, public_key_id, signature)"
                    " VALUES (:chain_id, :seq, :hash, :month_end,"
                    " :issue_time, :public_key_id, :signature)"
                    " ON CONFLICT DO NOTHING"
                ),
                point.__dict__,
            )

        return result.rowcount == 1
