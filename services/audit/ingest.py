"""The audit ingester: tail the edge's access-log file into the audit trail.

Run as `python -m services.audit.ingest`, beside Envoy (it reads Envoy's
log file). Each batch of lines becomes chained rows, and the file offset
after the batch is committed in the same transaction, so a restart of the
ingester or of PostgreSQL resumes exactly where the last commit ended:
nothing is skipped and nothing is stored twice. While the database is
down the lines wait in the file.

NOTE: Envoy writes the file from a buffer that it flushes on an interval
(`file_flush_interval` in the edge's bootstrap). A crash of Envoy itself
loses the entries of that last interval; a restart or shutdown does not.
"""

import asyncio
import datetime
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit import chain
from services.audit.entries import AuditRow, InvalidLogLine, audit_row
from services.common import db, metrics
from services.common.config import ConfigError, Environment
from services.common.logging import configure_logging

log = structlog.get_logger()

MAX_BATCH_LINES = 2000
# Longer lines are not Envoy's: skipped, with an error logged.
MAX_LINE_BYTES = 16384
IDLE_WAIT = 0.2
RETRY_WAITS = (0.5, 1.0, 2.0, 5.0)

_INSERT = text(
    "INSERT INTO audit.events (event_id, time, chain_id, seq, org_id,"
    " key_id, action, resource_type, method, endpoint, status_code,"
    " grpc_status, response_time_ms, request_id, client_address, prev_hash,"
    " hash) VALUES (:event_id, :time, :chain_id, :seq, :org_id, :key_id,"
    " :action, :resource_type, :method, :endpoint, :status_code,"
    " :grpc_status, :response_time_ms, :request_id, :client_address,"
    " :prev_hash, :hash)"
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


def read_batch(path: Path, start: int, limit: int = MAX_BATCH_LINES) -> Batch:
    """Read whole lines from `start`; a partial last line waits for more."""
    rows: list[AuditRow] = []
    skipped = 0
    end = start
    with path.open("rb") as handle:
        handle.seek(start)
        for _ in range(limit):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw or not raw.endswith(b"\n"):
                if len(raw) > MAX_LINE_BYTES:
                    # An overlong line: skip to its end.
                    rest = handle.readline()
                    if rest.endswith(b"\n"):
                        end += len(raw) + len(rest)
                        skipped += 1
                        log.error("audit.line_too_long", offset=end)
                        continue
                break
            try:
                rows.append(audit_row(json.loads(raw)))
            except (ValueError, InvalidLogLine) as error:
                skipped += 1
                log.error(
                    "audit.line_invalid",
                    offset=end,
                    error=str(error)[:200],
                )
            end += len(raw)

    return Batch(rows, start, end, skipped)


def chain_rows(
    rows: Sequence[AuditRow], heads: dict[uuid.UUID, tuple[int, bytes]]
) -> list[chain.Entry]:
    """Give each row its chain, sequence number and hashes.

    `heads` maps each chain to its newest (seq, hash) and is advanced.
    """
    entries = []
    for row in sorted(rows, key=lambda row: (row.time, row.request_id)):
        chain_id = chain.chain_of(row.org_id)
        seq, prev_hash = heads.get(chain_id, (0, chain.GENESIS_HASH))
        entry = chain.link_entry(
            **row.__dict__,
            chain_id=chain_id,
            seq=seq + 1,
            prev_hash=prev_hash,
        )
        heads[chain_id] = (entry.seq, entry.hash)
        entries.append(entry)

    return entries


class OffsetMoved(Exception):
    """Another ingester committed this source's offset meanwhile."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"committed offset is {offset}")
        self.offset = offset


class AuditIngester:
    def __init__(
        self, sessions: async_sessionmaker, path: Path, source: str
    ) -> None:
        self._sessions = sessions
        self._path = path
        self._source = source
        self._months: set[tuple[int, int]] = set()

    async def committed_offset(self) -> tuple[str, int] | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT file_id, byte_offset FROM audit.ingest_offsets"
                        " WHERE source = :source"
                    ),
                    {"source": self._source},
                )
            ).first()

        return None if row is None else (row[0], row[1])

    async def _ensure_partitions(
        self, session: AsyncSession, rows: Sequence[AuditRow]
    ) -> None:
        for row in rows:
            month = (row.time.year, row.time.month)
            if month not in self._months:
                await session.execute(
                    text("SELECT audit.ensure_month_partition(:day)"),
                    {"day": row.time.date()},
                )
                self._months.add(month)

    async def store(self, batch: Batch, current_file: str) -> None:
        """Insert a batch's rows and advance the offset, in one commit."""
        async with self._sessions.begin() as session:
            await session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:lock))"),
                {"lock": f"audit-ingest:{self._source}"},
            )
            committed = (
                await session.execute(
                    text(
                        "SELECT file_id, byte_offset FROM audit.ingest_offsets"
                        " WHERE source = :source"
                    ),
                    {"source": self._source},
                )
            ).first()
            if committed is not None and tuple(committed) != (
                current_file,
                batch.start,
            ):
                if committed[0] == current_file:
                    raise OffsetMoved(committed[1])
            await self._ensure_partitions(session, batch.rows)
            heads: dict[uuid.UUID, tuple[int, bytes]] = {}
            for chain_id in sorted(
                {chain.chain_of(r.org_id) for r in batch.rows}
            ):
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:lock))"),
                    {"lock": f"audit-chain:{chain_id}"},
                )
                head = (
                    await session.execute(
                        text("SELECT seq, hash FROM audit.chain_head(:chain)"),
                        {"chain": chain_id},
                    )
                ).first()
                if head is not None and head[0] is not None:
                    heads[chain_id] = (head[0], bytes(head[1]))
            entries = chain_rows(batch.rows, heads)
            if entries:
                await session.execute(
                    _INSERT, [entry.__dict__ for entry in entries]
                )
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
                    "offset": batch.end,
                },
            )

    async def run(self, stopping: asyncio.Event) -> None:
        """Tail the file until `stopping` is set."""
        offset = None
        current_file = ""
        failures = 0
        while not stopping.is_set():
            try:
                if not self._path.exists():
                    await _wait(stopping, IDLE_WAIT)
                    continue
                current_file = file_id(self._path)
                if offset is None:
                    offset = await self._start_offset(current_file)
                size = self._path.stat().st_size
                if size < offset:
                    log.warning(
                        "audit.log_truncated", offset=offset, size=size
                    )
                    offset = 0
                metrics.AUDIT_INGEST_BYTES_BEHIND.set(size - offset)
                batch = read_batch(self._path, offset)
                if batch.end == offset:
                    await _wait(stopping, IDLE_WAIT)
                    continue
                started = time.perf_counter()
                await self.store(batch, current_file)
                _observe_stored(batch)
                log.info(
                    "audit.batch_stored",
                    rows=len(batch.rows),
                    skipped_lines=batch.skipped_lines,
                    offset=batch.end,
                    duration_ms=round(
                        (time.perf_counter() - started) * 1000, 2
                    ),
                )
                offset = batch.end
                failures = 0
            except OffsetMoved as moved:
                log.warning("audit.offset_moved", offset=moved.offset)
                offset = moved.offset
            except (SQLAlchemyError, OSError) as error:
                wait = RETRY_WAITS[min(failures, len(RETRY_WAITS) - 1)]
                failures += 1
                metrics.AUDIT_INGEST_FAILURES.inc()
                log.error(
                    "audit.store_failed",
                    error=type(error).__name__,
                    offset=offset,
                    retry_in_s=wait,
                    attempt=failures,
                )
                await _wait(stopping, wait)

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


def _observe_stored(batch: Batch) -> None:
    committed = datetime.datetime.now(datetime.UTC)
    for row in batch.rows:
        lag = (committed - row.time).total_seconds()
        metrics.AUDIT_INGEST_LAG_SECONDS.observe(max(lag, 0.0))
    metrics.AUDIT_INGEST_ENTRIES.inc(len(batch.rows))
    metrics.AUDIT_INGEST_SKIPPED_LINES.inc(batch.skipped_lines)


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
    engine = db.create_engine(env.text("DATABASE_URL"), pool_size=2)
    ingester = AuditIngester(db.session_factory(engine), path, source)
    try:
        metrics_server = metrics.start_metrics_server(
            metrics.MetricsConfig.from_env(env)
        )
    except ConfigError as error:
        log.error("audit.ingester_config_invalid", error=str(error))
        raise SystemExit(2) from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    log.info("audit.ingester_started", source=source, pid=os.getpid())
    try:
        await ingester.run(stopping)
    finally:
        await engine.dispose()
        if metrics_server is not None:
            metrics_server.stop()
        log.info("audit.ingester_stopped", source=source)


if __name__ == "__main__":
    configure_logging("audit-ingest")
    asyncio.run(main())
