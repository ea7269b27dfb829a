"""The audit ingester: tail the edge's access-log file into the audit trail.

Run as `python -m services.audit.ingest`, beside Envoy (it reads Envoy's
log file). Each batch of lines becomes chained rows, and the file offset
after the batch is committed in the same transaction, so a restart of the
ingester or of PostgreSQL resumes exactly where the last commit ended:
nothing is skipped and nothing is stored twice. While the database is
down the lines wait in the file.

Past ARXIO_AUDIT_LOG_MAX_BYTES the ingester rotates the file. It renames
it to `<file>.rotated` and requests that Envoy's admin interface reopen
its logs, which creates a new file. It stores the renamed file's lines to
its end, commits the switch to the new file and deletes the renamed one.
A restart at any step finds the renamed file and finishes the rotation
from the committed offset.

NOTE: Envoy writes the file from a buffer that it flushes on an interval
(`file_flush_interval` in the edge's bootstrap). A crash of Envoy itself
loses the entries of that last interval; a restart or shutdown does not.
"""

import asyncio
import dataclasses
import datetime
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import httpx
import structlog
from sqlalchemy import TextClause, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit import chain
from services.audit.entries import (
    REPLACED_REQUEST_ID_PREFIX,
    AuditRow,
    InvalidLogLine,
    audit_row,
    replaced_request_id,
    unreadable_line_row,
)
from services.audit.log_rotation import (
    RotationSettings,
    reopen_envoy_logs,
    rotated_path,
)
from services.common import db, metrics
from services.common.config import ConfigError, Environment
from services.common.logging import configure_logging

log = structlog.get_logger()

MAX_BATCH_LINES = 2000
# Envoy cuts each value of its access-log format, so that its lines stay
# far below this (tests/audit/test_access_log.py). A longer line, such as
# one of an edge configured otherwise, is still stored, and counted.
MAX_LINE_BYTES = 16384
# The longest line that is parsed. A longer one is stored as an entry that
# records only that its line could not be read.
MAX_PARSED_LINE_BYTES = 1024 * 1024
IDLE_WAIT = 0.2
RETRY_WAITS = (0.5, 1.0, 2.0, 5.0)
# Seconds between tries to rename a file that could not be renamed, such
# as on a read-only volume.
ROTATION_RETRY_SECONDS = 60.0
# Seconds between requests that Envoy reopen its log, until it has.
REOPEN_RETRY_SECONDS = 1.0
# Defaults of the drain after SIGTERM: the longest it may take, and how
# long the file must stay read to its end, with no new line, before the
# ingester exits. The quiet time is 10 times Envoy's 200 ms flush interval.
DEFAULT_DRAIN_SECONDS = 30.0
DEFAULT_DRAIN_QUIET_SECONDS = 2.0


def _insert_arrays(
    table: str, columns: Sequence[tuple[str, str]]
) -> TextClause:
    """Build one INSERT of many rows, from one array parameter per column.

    `columns` lists (name, SQL type). The statement stays one statement
    whatever the number of rows, so a statement trigger runs once.
    """
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns)

    return text(
        f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})"
    )


# The trigger on audit.events checks each statement's rows against their
# chains' heads, as one set, so a batch is inserted in one statement.
_INSERT = _insert_arrays(
    "audit.events",
    [
        ("event_id", "uuid"),
        ("time", "timestamptz"),
        ("chain_id", "uuid"),
        ("seq", "bigint"),
        ("org_id", "uuid"),
        ("key_id", "text"),
        ("action", "text"),
        ("resource_type", "text"),
        ("method", "text"),
        ("endpoint", "text"),
        ("status_code", "integer"),
        ("grpc_status", "integer"),
        ("response_time_ms", "bigint"),
        ("request_id", "text"),
        ("client_address", "text"),
        ("prev_hash", "bytea"),
        ("hash", "bytea"),
        ("record_time", "timestamptz"),
    ],
)

_SELECT_STORED_IDS = text(
    "SELECT request_id FROM audit.request_ids"
    " WHERE request_id = ANY(:request_ids)"
)
# The fields that tell one request's entry from another's: every field
# of an access-log line's row but the event id, which the ingester makes.
_REPLAY_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(AuditRow)
    if field.name != "event_id"
)
_SELECT_STORED_ENTRIES = text(
    "SELECT "
    + ", ".join(
        "org_id::text" if name == "org_id" else name for name in _REPLAY_FIELDS
    )
    + " FROM audit.events"
    " WHERE chain_id = :chain AND request_id = ANY(:request_ids)"
)
_INSERT_REQUEST_IDS = _insert_arrays(
    "audit.request_ids",
    [("request_id", "text"), ("record_time", "timestamptz")],
)

_SELECT_OFFSET = text(
    "SELECT file_id, byte_offset FROM audit.ingest_offsets"
    " WHERE source = :source"
)


def file_id(path: Path) -> str:
    """Identify a file across renames: its device and inode."""
    stat = path.stat()

    return f"{stat.st_dev}:{stat.st_ino}"


@dataclass
class Batch:
    rows: list[AuditRow]
    start: int
    end: int
    skipped_lines: int
    # Lines over MAX_LINE_BYTES, each stored as an entry all the same.
    long_lines: int = 0


def _read_line(handle: BinaryIO) -> tuple[bytes, int] | None:
    """Read one whole line: its first MAX_PARSED_LINE_BYTES + 1 bytes and
    its length in bytes. Return None when the file ends within the line,
    which Envoy has not finished writing."""
    raw = handle.readline(MAX_LINE_BYTES + 1)
    if raw.endswith(b"\n"):
        return raw, len(raw)
    if len(raw) <= MAX_LINE_BYTES:
        return None
    prefix = bytearray(raw)
    length = len(raw)
    while True:
        chunk = handle.readline(MAX_LINE_BYTES)
        if not chunk:
            return None
        length += len(chunk)
        room = MAX_PARSED_LINE_BYTES + 1 - len(prefix)
        if room > 0:
            prefix += chunk[:room]
        if chunk.endswith(b"\n"):
            return bytes(prefix), length


def _parse_line(line: bytes, offset: int, length: int) -> AuditRow | None:
    """Build the row of a line. Return None for an invalid line of normal
    length, which is not a request's; a long one always gets a row."""
    if length > MAX_LINE_BYTES:
        log.error(
            "audit.line_too_long",
            offset=offset,
            bytes=length,
            max_bytes=MAX_LINE_BYTES,
        )
    try:
        if len(line) > MAX_PARSED_LINE_BYTES:
            raise InvalidLogLine(
                f"the line is longer than {MAX_PARSED_LINE_BYTES} bytes"
            )
        # A value that Envoy cut within a UTF-8 character keeps the rest.
        return audit_row(json.loads(line.decode("utf-8", "replace")))
    except (ValueError, InvalidLogLine) as error:
        log.error(
            "audit.line_invalid",
            offset=offset,
            bytes=length,
            error=str(error)[:200],
        )
        if length > MAX_LINE_BYTES:
            return unreadable_line_row(datetime.datetime.now(datetime.UTC))

        return None


def read_batch(path: Path, start: int, limit: int = MAX_BATCH_LINES) -> Batch:
    """Read whole lines from `start`; a partial last line waits for more."""
    batch = Batch([], start, start, 0)
    with path.open("rb") as handle:
        handle.seek(start)
        for _ in range(limit):
            read = _read_line(handle)
            if read is None:
                break
            line, length = read
            row = _parse_line(line, batch.end, length)
            if row is None:
                batch.skipped_lines += 1
            else:
                batch.rows.append(row)
            if length > MAX_LINE_BYTES:
                batch.long_lines += 1
            batch.end += length

    return batch


def replay_key(row: AuditRow) -> tuple:
    """Return the fields that an exact copy of the row's line repeats."""
    return tuple(getattr(row, name) for name in _REPLAY_FIELDS)


def drop_replays(
    rows: Sequence[AuditRow], stored: set[tuple]
) -> tuple[list[AuditRow], int]:
    """Drop each row whose `replay_key` is in `stored` or on an earlier
    row: a copy of a line already stored, not a request of its own. Return
    the rows left and how many were dropped.

    `stored` contains the replay keys of entries in the trail. It is
    extended.
    """
    kept = []
    for row in rows:
        key = replay_key(row)
        if key not in stored:
            stored.add(key)
            kept.append(row)

    return kept, len(rows) - len(kept)


def unique_request_ids(
    rows: Sequence[AuditRow], stored: set[str]
) -> tuple[list[AuditRow], int]:
    """Give a fresh id to each row whose id is in `stored` or on an earlier
    row. Return the rows and how many ids were replaced.

    `stored` is the set of ids already in the trail. It is extended.
    """
    unique = []
    replaced = 0
    for row in rows:
        if row.request_id in stored:
            row = dataclasses.replace(row, request_id=replaced_request_id())
            replaced += 1
        stored.add(row.request_id)
        unique.append(row)

    return unique, replaced


class ChainHead(NamedTuple):
    """A chain's newest stored entry: what the next entry links to."""

    seq: int
    hash: bytes
    record_time: datetime.datetime


@dataclass(frozen=True)
class Linked:
    """An entry ready to insert, with the partition key it is filed by."""

    entry: chain.Entry
    # The entry's time, or the previous entry's record_time when that is
    # later, so that a chain's entries fill the monthly partitions in seq
    # order and the retention job can drop a month without leaving a gap.
    record_time: datetime.datetime

    def parameters(self) -> dict:
        return {**self.entry.__dict__, "record_time": self.record_time}


def column_arrays(
    rows: Sequence[dict], names: Sequence[str] | None = None
) -> dict[str, list]:
    """Turn rows into one list per column, for an `_insert_arrays` statement.

    Takes the columns `names`, or every column of the first row.
    """
    names = list(rows[0]) if names is None else names

    return {name: [row[name] for row in rows] for name in names}


def chain_rows(
    rows: Sequence[AuditRow], heads: dict[uuid.UUID, ChainHead]
) -> list[Linked]:
    """Give each row its chain, sequence number, hashes and record time.

    `heads` maps each chain to its newest entry and is advanced.
    """
    linked = []
    for row in sorted(rows, key=lambda row: (row.time, row.request_id)):
        chain_id = chain.chain_of(row.org_id)
        head = heads.get(chain_id)
        entry = chain.link_entry(
            **row.__dict__,
            chain_id=chain_id,
            seq=head.seq + 1 if head else 1,
            prev_hash=head.hash if head else chain.GENESIS_HASH,
        )
        record_time = max(row.time, head.record_time) if head else row.time
        heads[chain_id] = ChainHead(entry.seq, entry.hash, record_time)
        linked.append(Linked(entry, record_time))

    return linked


class Stored(NamedTuple):
    """Counts of a committed batch's rows that were not stored as read."""

    # Rows stored under a fresh request id, because an entry of another
    # request had theirs.
    replaced: int
    # Lines skipped as copies of lines already stored.
    replayed: int


class OffsetMoved(Exception):
    """Another ingester committed this source's offset meanwhile."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"committed offset is {offset}")
        self.offset = offset


class AuditIngester:
    def __init__(
        self,
        sessions: async_sessionmaker,
        path: Path,
        source: str,
        rotation: RotationSettings | None = None,
    ) -> None:
        self._sessions = sessions
        self._path = path
        self._rotated_path = rotated_path(path)
        self._source = source
        # None never rotates the file.
        self._rotation = rotation
        self._months: set[tuple[int, int]] = set()
        # The file being read, by file_id, and how far it has been stored.
        self._file: str | None = None
        self._offset = 0
        # time.monotonic() before which no rotation or reopen is tried.
        self._rotate_after = 0.0
        self._reopen_after = 0.0

    async def committed_offset(self) -> tuple[str, int] | None:
        async with self._sessions() as session:
            row = (
                await session.execute(_SELECT_OFFSET, {"source": self._source})
            ).first()

        return None if row is None else (row[0], row[1])

    async def _ensure_partitions(
        self, session: AsyncSession, linked: Sequence[Linked]
    ) -> None:
        for item in linked:
            moment = item.record_time.astimezone(datetime.UTC)
            month = (moment.year, moment.month)
            if month not in self._months:
                await session.execute(
                    text("SELECT audit.ensure_month_partition(:day)"),
                    {"day": moment.date()},
                )
                self._months.add(month)

    async def _claim_offset(
        self, session: AsyncSession, current_file: str, offset: int
    ) -> None:
        """Lock this source's offset for the transaction; raise OffsetMoved
        if another ingester committed a different one for the file."""
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:lock))"),
            {"lock": f"audit-ingest:{self._source}"},
        )
        committed = (
            await session.execute(_SELECT_OFFSET, {"source": self._source})
        ).first()
        if (
            committed is not None
            and committed[0] == current_file
            and committed[1] != offset
        ):
            raise OffsetMoved(committed[1])

    async def _commit_offset(
        self, session: AsyncSession, current_file: str, offset: int
    ) -> None:
        await session.execute(
            text(
                "INSERT INTO audit.ingest_offsets (source, file_id,"
                " byte_offset) VALUES (:source, :file_id, :offset)"
                " ON CONFLICT (source) DO UPDATE SET file_id ="
                " excluded.file_id, byte_offset = excluded.byte_offset,"
                " update_time = now()"
            ),
            {
                "source": self._source,
                "file_id": current_file,
                "offset": offset,
            },
        )

    async def _stored_replay_keys(
        self, session: AsyncSession, rows: Sequence[AuditRow]
    ) -> set[tuple]:
        """Return the replay keys of the stored entries that have the
        request id of one of `rows`, read chain by chain under row-level
        security."""
        if not rows:
            return set()
        ids_by_chain: dict[uuid.UUID, list[str]] = {}
        for row in rows:
            chain_id = chain.chain_of(row.org_id)
            ids_by_chain.setdefault(chain_id, []).append(row.request_id)
        keys: set[tuple] = set()
        for chain_id, request_ids in ids_by_chain.items():
            await session.execute(
                text("SELECT set_config('arxio.chain_id', :chain, true)"),
                {"chain": str(chain_id)},
            )
            found = await session.execute(
                _SELECT_STORED_ENTRIES,
                {"chain": chain_id, "request_ids": request_ids},
            )
            keys.update(tuple(entry) for entry in found)
        await session.execute(
            text("SELECT set_config('arxio.chain_id', '', true)")
        )

        return keys

    async def _unique_rows(
        self, session: AsyncSession, rows: Sequence[AuditRow]
    ) -> tuple[list[AuditRow], Stored]:
        """Drop the rows of replayed lines, then replace the request ids
        that the trail or the batch has already.

        A row is replayed when an entry has its request id, time and every
        other field: an exact copy of a stored line appended to the log.
        Only a different request with a repeated id gets a fresh id.
        NOTE: a copy of a line whose entry the retention job dropped
        matches no entry, so it is stored under a fresh id.

        Another ingester may store one of the ids after the check: then
        the insert into audit.request_ids fails, the batch is retried, and
        the check finds that id.
        """
        found = await session.execute(
            _SELECT_STORED_IDS,
            {"request_ids": [row.request_id for row in rows]},
        )
        stored = set(found.scalars())
        repeated = [row for row in rows if row.request_id in stored]
        stored_keys = await self._stored_replay_keys(session, repeated)
        rows, replayed = drop_replays(rows, stored_keys)
        if replayed:
            log.warning(
                "audit.line_replayed",
                skipped=replayed,
                offset=self._offset,
            )
        unique, replaced = unique_request_ids(rows, stored)
        if replaced:
            log.warning(
                "audit.request_id_repeated",
                replaced=replaced,
                offset=self._offset,
            )

        return unique, Stored(replaced, replayed)

    async def store(self, batch: Batch, current_file: str) -> Stored:
        """Insert a batch's rows and advance the offset, in one commit.

        Returns how many rows got a fresh request id because the trail or
        the batch had theirs already, and how many replayed lines were
        skipped.
        """
        async with self._sessions.begin() as session:
            await self._claim_offset(session, current_file, batch.start)
            rows, stored = await self._unique_rows(session, batch.rows)
            heads: dict[uuid.UUID, ChainHead] = {}
            for chain_id in sorted({chain.chain_of(r.org_id) for r in rows}):
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:lock))"),
                    {"lock": f"audit-chain:{chain_id}"},
                )
                head = (
                    await session.execute(
                        text(
                            "SELECT seq, hash, record_time"
                            " FROM audit.chain_head(:chain)"
                        ),
                        {"chain": chain_id},
                    )
                ).first()
                if head is not None and head[0] is not None:
                    heads[chain_id] = ChainHead(
                        head[0], bytes(head[1]), head[2]
                    )
            linked = chain_rows(rows, heads)
            await self._ensure_partitions(session, linked)
            if linked:
                rows = [item.parameters() for item in linked]
                await session.execute(
                    _INSERT_REQUEST_IDS,
                    column_arrays(rows, ["request_id", "record_time"]),
                )
                await session.execute(_INSERT, column_arrays(rows))
            await self._commit_offset(session, current_file, batch.end)

        return stored

    async def switch_file(
        self, old_file: str, old_end: int, new_file: str
    ) -> None:
        """Commit that `old_file` was read to `old_end` and that reading
        goes on with `new_file` at offset 0."""
        async with self._sessions.begin() as session:
            await self._claim_offset(session, old_file, old_end)
            await self._commit_offset(session, new_file, 0)

    async def _read_step(self) -> bool:
        """Store the next lines, of the rotated file first if there is one;
        return whether any were read."""
        if self._rotated_path.exists():
            return await self._read_rotated()

        return await self._read_current()

    def _store_failed(
        self, error: BaseException, attempt: int, **fields
    ) -> float:
        """Count and log a failed store; return the seconds to wait.

        A database error is logged with its SQLSTATE and the constraint it
        broke, never its detail, which may quote the row.
        """
        wait = RETRY_WAITS[min(attempt - 1, len(RETRY_WAITS) - 1)]
        metrics.AUDIT_INGEST_FAILURES.inc()
        diagnostic = getattr(getattr(error, "orig", None), "diag", None)
        if diagnostic is not None:
            fields |= {
                "sqlstate": diagnostic.sqlstate,
                "constraint": diagnostic.constraint_name,
            }
        log.error(
            "audit.store_failed",
            error=type(error).__name__,
            offset=self._offset,
            retry_in_s=wait,
            attempt=attempt,
            **fields,
        )

        return wait

    async def run(self, stopping: asyncio.Event) -> None:
        """Tail the file until `stopping` is set."""
        failures = 0
        while not stopping.is_set():
            try:
                progressed = await self._read_step()
                failures = 0
                if not progressed:
                    await _wait(stopping, IDLE_WAIT)
            except OffsetMoved as moved:
                log.warning("audit.offset_moved", offset=moved.offset)
                self._offset = moved.offset
            except (SQLAlchemyError, OSError) as error:
                failures += 1
                await _wait(stopping, self._store_failed(error, failures))

    async def drain(self, max_seconds: float, quiet_seconds: float) -> bool:
        """Store the file's remaining lines after a stop request.

        Reads on until the file is read to its end and no line has arrived
        for `quiet_seconds`, or until `max_seconds` have passed. Store
        failures are retried until then. In the Kubernetes pod the ingester
        is a native sidecar, which the kubelet signals only after Envoy has
        exited, so no rotation is started: no Envoy would reopen its log.
        Returns whether the file was read to its end.
        """
        self._rotation = None
        started = time.monotonic()
        deadline = started + max_seconds
        last_progress = started
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error(
                    "audit.drain_timed_out",
                    max_seconds=max_seconds,
                    offset=self._offset,
                    bytes_behind=self._bytes_behind(),
                )
                return False
            try:
                progressed = await self._read_step()
            except OffsetMoved as moved:
                log.warning("audit.offset_moved", offset=moved.offset)
                self._offset = moved.offset
                continue
            except (SQLAlchemyError, OSError) as error:
                failures += 1
                wait = self._store_failed(error, failures, draining=True)
                await asyncio.sleep(min(wait, remaining))
                continue
            failures = 0
            now = time.monotonic()
            if progressed:
                last_progress = now
            elif now - last_progress >= quiet_seconds:
                log.info(
                    "audit.drained",
                    offset=self._offset,
                    duration_s=round(now - started, 3),
                )
                return True
            else:
                await asyncio.sleep(min(IDLE_WAIT, remaining))

    def _bytes_behind(self) -> int:
        """Return the bytes of the log files not yet stored."""
        behind = 0
        if self._rotated_path.exists():
            behind += self._rotated_path.stat().st_size - self._offset
            if self._path.exists():
                behind += self._path.stat().st_size
        elif self._path.exists():
            behind += self._path.stat().st_size - self._offset

        return max(behind, 0)

    async def _store_from(self, path: Path, current_file: str) -> bool:
        """Store the next batch of `path`; return False if it had none."""
        batch = read_batch(path, self._offset)
        if batch.end == self._offset:
            return False
        started = time.perf_counter()
        stored = await self.store(batch, current_file)
        _observe_stored(batch, stored)
        log.info(
            "audit.batch_stored",
            rows=len(batch.rows),
            skipped_lines=batch.skipped_lines,
            offset=batch.end,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        self._offset = batch.end

        return True

    async def _read_current(self) -> bool:
        if not self._path.exists():
            return False
        current_file = file_id(self._path)
        if current_file != self._file:
            self._offset = await self._start_offset(current_file)
            self._file = current_file
        size = self._path.stat().st_size
        if size < self._offset:
            log.warning("audit.log_truncated", offset=self._offset, size=size)
            self._offset = 0
        metrics.AUDIT_INGEST_BYTES_BEHIND.set(size - self._offset)
        if self._rotation_due(size):
            # Reading goes on in the renamed file, which keeps its file_id.
            return self._start_rotation(size)

        return await self._store_from(self._path, current_file)

    def _rotation_due(self, size: int) -> bool:
        return (
            self._rotation is not None
            and self._rotation.max_bytes > 0
            and size >= self._rotation.max_bytes
            and time.monotonic() >= self._rotate_after
        )

    def _start_rotation(self, size: int) -> bool:
        try:
            os.rename(self._path, self._rotated_path)
        except OSError as error:
            self._rotate_after = time.monotonic() + ROTATION_RETRY_SECONDS
            log.error(
                "audit.log_rotation_failed",
                path=str(self._path),
                error=f"{type(error).__name__}: {error.strerror}",
                retry_in_s=ROTATION_RETRY_SECONDS,
            )
            return False
        log.info("audit.log_rotation_started", path=str(self._path), size=size)

        return True

    async def _read_rotated(self) -> bool:
        """Read the renamed file to its end once Envoy has reopened its log,
        then delete it and go on with the new file.

        Runs after a rename, and after a restart that finds the renamed
        file, which is read on from the committed offset.
        """
        rotated_file = file_id(self._rotated_path)
        if self._file != rotated_file:
            if not await self._resume_rotated(rotated_file):
                return True
        # Envoy closes the renamed file before it creates the new one, so
        # once the new file exists, the renamed one has all its lines.
        reopened = self._path.exists()
        if not reopened:
            await self._request_reopen()
        if await self._store_from(self._rotated_path, rotated_file):
            return True
        if not reopened:
            return False
        size = self._rotated_path.stat().st_size
        if size > self._offset:
            # A line that Envoy never finished, such as at a crash.
            log.error(
                "audit.rotated_log_incomplete_line",
                offset=self._offset,
                bytes=size - self._offset,
            )
        new_file = file_id(self._path)
        await self.switch_file(rotated_file, self._offset, new_file)
        self._rotated_path.unlink()
        log.info(
            "audit.log_rotated",
            path=str(self._path),
            rotated_bytes=size,
        )
        self._file, self._offset = new_file, 0

        return True

    async def _resume_rotated(self, rotated_file: str) -> bool:
        """Find where to read the renamed file found at start.

        Returns False when it was read already and is now deleted.
        """
        committed = await self.committed_offset()
        if committed is not None and committed[0] == rotated_file:
            self._file, self._offset = rotated_file, committed[1]
            log.info(
                "audit.log_rotation_resumed",
                offset=self._offset,
                path=str(self._rotated_path),
            )
            return True
        if (
            committed is not None
            and self._path.exists()
            and committed[0] == file_id(self._path)
        ):
            # Read and switched from before a restart: only the deletion
            # was left.
            self._rotated_path.unlink()
            log.info("audit.log_rotated", path=str(self._path))
            return False
        log.warning(
            "audit.log_replaced",
            committed_file=committed[0] if committed else "",
            current_file=rotated_file,
        )
        self._file, self._offset = rotated_file, 0

        return True

    async def _request_reopen(self) -> None:
        if self._rotation is None or time.monotonic() < self._reopen_after:
            return
        self._reopen_after = time.monotonic() + REOPEN_RETRY_SECONDS
        url = self._rotation.envoy_admin_url
        try:
            await reopen_envoy_logs(url)
        except httpx.HTTPError as error:
            log.error(
                "audit.log_reopen_failed",
                envoy_admin_url=url,
                error=f"{type(error).__name__}: {error}"[:300],
                retry_in_s=REOPEN_RETRY_SECONDS,
            )

    async def _start_offset(self, current_file: str) -> int:
        committed = await self.committed_offset()
        if committed is None:
            log.info("audit.ingest_started", offset=0, resumed=False)
            return 0
        if committed[0] != current_file:
            log.warning(
                "audit.log_replaced",
                committed_file=committed[0],
                current_file=current_file,
            )
            return 0
        log.info("audit.ingest_started", offset=committed[1], resumed=True)

        return committed[1]


def _observe_stored(batch: Batch, stored: Stored) -> None:
    committed = datetime.datetime.now(datetime.UTC)
    for row in batch.rows:
        lag = (committed - row.time).total_seconds()
        metrics.AUDIT_INGEST_LAG_SECONDS.observe(max(lag, 0.0))
    metrics.AUDIT_INGEST_ENTRIES.inc(len(batch.rows) - stored.replayed)
    metrics.AUDIT_INGEST_REPLAYED_LINES.inc(stored.replayed)
    metrics.AUDIT_INGEST_SKIPPED_LINES.inc(batch.skipped_lines)
    metrics.AUDIT_INGEST_LONG_LINES.inc(batch.long_lines)
    not_edge = sum(
        1
        for row in batch.rows
        if row.request_id.startswith(REPLACED_REQUEST_ID_PREFIX)
    )
    replaced = metrics.AUDIT_INGEST_REPLACED_REQUEST_IDS
    replaced.labels(reason="not_edge_form").inc(not_edge)
    replaced.labels(reason="repeated").inc(stored.replaced)


async def _wait(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass


async def main() -> None:
    import signal

    env = Environment()
    # The file may not exist yet: Envoy creates it on its first request.
    path = Path(env.text("ARXIO_AUDIT_LOG_FILE"))
    source = env.text("ARXIO_AUDIT_SOURCE", "edge")
    try:
        # A small pool: the ingester opens one session at a time.
        engine = db.create_pooled_engine(
            env.text("DATABASE_URL"), db.PoolSettings.from_env(env, 2)
        )
        rotation = RotationSettings.from_env(env)
        drain_seconds = env.number(
            "ARXIO_AUDIT_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS
        )
        drain_quiet_seconds = env.number(
            "ARXIO_AUDIT_DRAIN_QUIET_SECONDS", DEFAULT_DRAIN_QUIET_SECONDS
        )
        metrics_server = metrics.start_metrics_server(
            metrics.MetricsConfig.from_env(env)
        )
    except ConfigError as error:
        log.error("audit.ingester_config_invalid", error=str(error))
        raise SystemExit(2) from None
    ingester = AuditIngester(
        db.session_factory(engine), path, source, rotation
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    log.info(
        "audit.ingester_started",
        source=source,
        pid=os.getpid(),
        rotate_at_bytes=rotation.max_bytes,
    )
    try:
        await ingester.run(stopping)
        log.info(
            "audit.ingester_draining",
            source=source,
            max_seconds=drain_seconds,
            quiet_seconds=drain_quiet_seconds,
        )
        await ingester.drain(drain_seconds, drain_quiet_seconds)
    finally:
        await engine.dispose()
        if metrics_server is not None:
            metrics_server.stop()
        log.info("audit.ingester_stopped", source=source)


if __name__ == "__main__":
    configure_logging("audit-ingest")
    asyncio.run(main())
