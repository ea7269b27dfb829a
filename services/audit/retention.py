"""The audit retention job: drop old monthly partitions of the trail whole.

    DATABASE_URL=postgresql://... \\
    ARXIO_AUDIT_TRUSTED_KEYS=.run/audit-signing.pub \\
        python -m services.audit.retention [--dry-run]

This job is the trail's only deletion path. It keeps the current month and
the ARXIO_AUDIT_RETENTION_MONTHS (default 12) whole months before it. It
drops each older partition of audit.events whole, oldest first, as the
owner role: it runs SET ROLE arxio_owner, so DATABASE_URL must name a
superuser or a member of that role. A partition is dropped only when every
chain with rows in it passes three checks:

- a checkpoint signed by a trusted key is at the chain's last seq in the
  partition (the audit service signs one at each month end);
- no entry of the chain with a lower or equal seq is in another partition;
- the chain's entries in the partition, from the previous retention cut
  on, recompute to that checkpoint, so a month whose entries were changed
  is kept and the change stays visible.

Each chain's cut goes into audit.retention_cuts in the transaction that
drops the partition, so the remaining trail verifies from the checkpoint
on. When a check fails, the job drops nothing more, logs the partition,
the chain and the reason, and exits with code 3. After the drops it
deletes the dropped entries' ids from audit.request_ids, which keeps each
stored request id unique.
"""

import argparse
import datetime
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)
from psycopg import sql

from services.audit import chain
from services.audit.chain import (
    DEFAULT_RETENTION_MONTHS,
    MAX_RETENTION_MONTHS,
    retention_cutoff,
)
from services.common.config import ConfigError, Environment
from services.common.db import check_sslmode
from services.common.logging import configure_logging
from services.common.migrations import OWNER_ROLE

log = structlog.get_logger()

EXIT_REJECTED = 3
# Entries read per verification window. A window runs from one checkpoint
# to a later one, so memory stays bounded however long a month is.
WINDOW_ENTRIES = 50_000
# How long the drop waits for running queries and inserts on audit.events.
# New ones queue behind it meanwhile, so keep it short.
LOCK_TIMEOUT = "10s"

_BOUNDS = re.compile(r"FOR VALUES FROM \('([^']+)'\) TO \('([^']+)'\)")
_ENTRY_COLUMNS = (
    "event_id, time, chain_id, seq, org_id::text, key_id, action,"
    " resource_type, method, endpoint, status_code, grpc_status,"
    " response_time_ms, request_id, client_address, prev_hash, hash"
)
_CHECKPOINT_COLUMNS = (
    "chain_id, seq, hash, month_end, issue_time, public_key_id, signature"
)


@dataclass(frozen=True)
class Partition:
    """A partition of audit.events and its record_time range, `upper`
    excluded."""

    name: str
    lower: datetime.datetime
    upper: datetime.datetime


@dataclass(frozen=True)
class ChainSpan:
    """The entries of one chain in one partition."""

    chain_id: uuid.UUID
    rows: int
    first_seq: int
    last_seq: int


class DropRejected(Exception):
    """A partition that cannot be dropped without breaking a chain."""

    def __init__(
        self,
        partition: str,
        reason: str,
        chain_id: uuid.UUID | None = None,
        seq: int = 0,
        event_id: str = "",
    ) -> None:
        super().__init__(reason)
        self.partition = partition
        self.reason = reason
        self.chain_id = chain_id
        self.seq = seq
        self.event_id = event_id

    def to_json(self) -> dict:
        return {
            "partition": self.partition,
            "chainId": str(self.chain_id) if self.chain_id else "",
            "seq": self.seq,
            "eventId": self.event_id,
            "reason": self.reason,
        }


@dataclass
class RetentionReport:
    """Outcome of one run: the partitions dropped (in a dry run, the ones
    that would be dropped) and the partition it stopped at, if any."""

    retention_months: int
    cutoff: datetime.datetime
    dry_run: bool
    dropped: list[dict] = field(default_factory=list)
    rejected: DropRejected | None = None

    def to_json(self) -> dict:
        return {
            "retentionMonths": self.retention_months,
            "cutoff": chain.utc_text(self.cutoff),
            "dryRun": self.dry_run,
            ("wouldDrop" if self.dry_run else "dropped"): self.dropped,
            "rejected": self.rejected.to_json() if self.rejected else None,
        }


def partition_bounds(
    bound: str,
) -> tuple[datetime.datetime, datetime.datetime] | None:
    """Parse a range partition's `pg_get_expr(relpartbound)` text.

    Returns None for a DEFAULT partition or a MINVALUE or MAXVALUE bound.
    """
    match = _BOUNDS.fullmatch(bound.strip())
    if match is None:
        return None

    return (
        datetime.datetime.fromisoformat(match[1]),
        datetime.datetime.fromisoformat(match[2]),
    )


def verification_windows(
    previous_cut: int,
    checkpoint_seqs: Sequence[int],
    last_seq: int,
    size: int = WINDOW_ENTRIES,
) -> list[tuple[int, int]]:
    """Split seq `previous_cut` + 1 to `last_seq` at checkpoints.

    Each window (start, end) starts and ends at a checkpoint, or at the
    previous cut, and spans at least `size` entries unless it is the last.
    """
    windows = []
    start = previous_cut
    for seq in sorted(set(checkpoint_seqs)):
        if previous_cut < seq < last_seq and seq - start >= size:
            windows.append((start, seq))
            start = seq
    windows.append((start, last_seq))

    return windows


def month_partitions(connection: psycopg.Connection) -> list[Partition]:
    """List the partitions of audit.events, oldest first."""
    rows = connection.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'audit.events'::regclass"
    ).fetchall()
    partitions = []
    for name, bound in rows:
        bounds = partition_bounds(bound)
        if bounds is None:
            log.warning(
                "audit.retention_partition_skipped",
                partition=name,
                reason="not a time range with two bounds",
            )
            continue
        partitions.append(Partition(name, *bounds))

    return sorted(partitions, key=lambda partition: partition.lower)


def chain_spans(
    connection: psycopg.Connection, partition: Partition
) -> dict[uuid.UUID, ChainSpan]:
    rows = connection.execute(
        sql.SQL(
            "SELECT chain_id, count(*), min(seq), max(seq) FROM audit.{}"
            " GROUP BY chain_id"
        ).format(sql.Identifier(partition.name))
    ).fetchall()

    return {row[0]: ChainSpan(*row) for row in rows}


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


def _entries(cursor: psycopg.Cursor) -> Iterator[chain.Entry]:
    for row in cursor:
        yield chain.Entry(
            *row[:15], prev_hash=bytes(row[15]), hash=bytes(row[16])
        )


@dataclass
class DryRunState:
    """Removals that a dry run counts as done: the cuts of the partitions
    it passed and their time range."""

    cuts: dict[uuid.UUID, int] = field(default_factory=dict)
    # Upper bound of the newest partition passed: older entries count as
    # removed.
    removed_before: datetime.datetime | None = None

    def record(
        self, partition: Partition, spans: Mapping[uuid.UUID, ChainSpan]
    ) -> None:
        for span in spans.values():
            self.cuts[span.chain_id] = span.last_seq
        self.removed_before = partition.upper


def _previous_cut(
    connection: psycopg.Connection,
    chain_id: uuid.UUID,
    dry_run: DryRunState | None,
) -> int:
    stored = connection.execute(
        "SELECT coalesce(max(last_removed_seq), 0) FROM audit.retention_cuts"
        " WHERE chain_id = %s",
        (chain_id,),
    ).fetchone()[0]
    if dry_run is None:
        return stored

    return max(stored, dry_run.cuts.get(chain_id, 0))


def _require_signed_checkpoint(
    partition: Partition,
    span: ChainSpan,
    points: Sequence[chain.Checkpoint],
    keys: Mapping[str, Ed25519PublicKey],
) -> None:
    anchor = next(
        (p for p in points if p.seq == span.last_seq and p.month_end),
        None,
    )
    if anchor is None:
        raise DropRejected(
            partition.name,
            f"no month-end checkpoint at seq {span.last_seq}, the chain's "
            "last entry "
            f"in {partition.name}: the audit service signs one at its first "
            "checkpoint run after the month ends, so run the job again "
            "after that",
            span.chain_id,
            span.last_seq,
        )
    if not chain.signature_valid(anchor, keys):
        raise DropRejected(
            partition.name,
            f"the checkpoint at seq {span.last_seq} has no valid signature "
            f"of a trusted key (key id {anchor.public_key_id}): list the "
            "public key that signed it in ARXIO_AUDIT_TRUSTED_KEYS",
            span.chain_id,
            span.last_seq,
        )


def _require_no_entry_elsewhere(
    connection: psycopg.Connection,
    partition: Partition,
    span: ChainSpan,
    removed_before: datetime.datetime | None,
) -> None:
    # The ingester files a chain's entries by a record_time that never goes
    # backwards along the chain, so this finds an entry only where that
    # order was broken, such as by a row moved between partitions. The
    # record_time condition prunes the partition being checked from the
    # scan.
    query = (
        "SELECT tableoid::regclass::text, seq, event_id FROM audit.events"
        " WHERE chain_id = %(chain)s AND seq <= %(last)s"
        " AND (record_time < %(lower)s OR record_time >= %(upper)s)"
    )
    if removed_before is not None:
        query += " AND record_time >= %(removed_before)s"
    row = connection.execute(
        query + " ORDER BY seq LIMIT 1",
        {
            "chain": span.chain_id,
            "last": span.last_seq,
            "lower": partition.lower,
            "upper": partition.upper,
            "removed_before": removed_before,
        },
    ).fetchone()
    if row is not None:
        raise DropRejected(
            partition.name,
            f"entry {row[2]} at seq {row[1]} is in {row[0]}, at or below "
            f"the chain's last seq {span.last_seq} in {partition.name}: "
            "dropping the partition would leave a gap before it",
            span.chain_id,
            row[1],
            str(row[2]),
        )


def _verify_span(
    connection: psycopg.Connection,
    partition: Partition,
    span: ChainSpan,
    previous_cut: int,
    points: Sequence[chain.Checkpoint],
    keys: Mapping[str, Ed25519PublicKey],
) -> None:
    windows = verification_windows(
        previous_cut, [point.seq for point in points], span.last_seq
    )
    query = sql.SQL(
        "SELECT {} FROM audit.{} WHERE chain_id = %s AND seq > %s"
        " AND seq <= %s ORDER BY seq"
    ).format(sql.SQL(_ENTRY_COLUMNS), sql.Identifier(partition.name))
    for start, end in windows:
        with connection.cursor(name="retention_entries") as cursor:
            cursor.itersize = 5000
            cursor.execute(query, (span.chain_id, start, end))
            result = chain.verify_chain(
                span.chain_id,
                _entries(cursor),
                [point for point in points if start <= point.seq <= end],
                keys,
                last_removed_seq=start,
                # Each window starts at a checkpoint and ends at one.
                segment=True,
            )
        if not result.intact:
            first = result.problems[0]
            raise DropRejected(
                partition.name,
                f"the chain does not verify ({first.kind}): {first.message}",
                span.chain_id,
                first.seq,
                first.event_id,
            )


def check_chain(
    connection: psycopg.Connection,
    partition: Partition,
    span: ChainSpan,
    keys: Mapping[str, Ed25519PublicKey],
    dry_run: DryRunState | None = None,
) -> None:
    """Raise DropRejected unless `span` may be dropped with `partition`.

    With `dry_run`, the partitions that run already passed count as
    removed.
    """
    previous_cut = _previous_cut(connection, span.chain_id, dry_run)
    points = [
        _checkpoint(row)
        for row in connection.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints"
            " WHERE chain_id = %s AND seq BETWEEN %s AND %s ORDER BY seq",
            (span.chain_id, previous_cut, span.last_seq),
        )
    ]
    _require_signed_checkpoint(partition, span, points, keys)
    _require_no_entry_elsewhere(
        connection,
        partition,
        span,
        dry_run.removed_before if dry_run else None,
    )
    _verify_span(connection, partition, span, previous_cut, points, keys)


def check_partition(
    connection: psycopg.Connection,
    partition: Partition,
    keys: Mapping[str, Ed25519PublicKey],
    dry_run: DryRunState | None = None,
) -> dict[uuid.UUID, ChainSpan]:
    """Check every chain in `partition` and return its entries there.

    Runs in one read-only snapshot and takes no lock that blocks writers.
    """
    with connection.transaction():
        connection.execute(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        )
        spans = chain_spans(connection, partition)
        for span in spans.values():
            check_chain(connection, partition, span, keys, dry_run)

    return spans


def drop_partition(
    connection: psycopg.Connection,
    partition: Partition,
    spans: Mapping[uuid.UUID, ChainSpan],
) -> None:
    """Record each chain's cut and drop `partition`, in one transaction.

    The exclusive lock on audit.events keeps inserts out while the job
    confirms that the partition still contains exactly the checked
    entries.
    """
    try:
        with connection.transaction():
            connection.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(LOCK_TIMEOUT)
                )
            )
            connection.execute(
                "LOCK TABLE ONLY audit.events IN ACCESS EXCLUSIVE MODE"
            )
            if chain_spans(connection, partition) != spans:
                raise DropRejected(
                    partition.name,
                    f"entries were added to {partition.name} while it was "
                    "checked: run the job again",
                )
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO audit.retention_cuts (chain_id,"
                    " last_removed_seq, partition_name) VALUES (%s, %s, %s)",
                    [
                        (span.chain_id, span.last_seq, partition.name)
                        for span in spans.values()
                    ],
                )
            connection.execute(
                sql.SQL("DROP TABLE audit.{}").format(
                    sql.Identifier(partition.name)
                )
            )
    except psycopg.errors.LockNotAvailable:
        raise DropRejected(
            partition.name,
            f"audit.events stayed locked by other sessions for "
            f"{LOCK_TIMEOUT}: run the job again when the load is lower",
        ) from None


def delete_dropped_request_ids(connection: psycopg.Connection) -> int:
    """Delete the ids in audit.request_ids of the entries dropped already;
    return how many.

    Their record_time is before the oldest partition left. A run stopped
    between a drop and this deletion leaves ids that the next run deletes.
    """
    partitions = month_partitions(connection)
    if not partitions:
        return 0

    return connection.execute(
        "DELETE FROM audit.request_ids WHERE record_time < %s",
        (partitions[0].lower,),
    ).rowcount


def run_retention(
    connection: psycopg.Connection,
    months: int,
    keys: Mapping[str, Ed25519PublicKey],
    now: datetime.datetime,
    dry_run: bool = False,
) -> RetentionReport:
    """Drop every expired partition that passes its checks, oldest first.

    `connection` must be in autocommit mode, and the job switches it to
    the owner role. The run stops at the first partition it may not drop,
    because dropping a newer partition before an older one leaves a gap.
    """
    connection.execute(
        sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE))
    )
    connection.execute("SET TimeZone = 'UTC'")
    cutoff = retention_cutoff(now, months)
    report = RetentionReport(months, cutoff, dry_run)
    # Held until the connection closes, so two runs never check and drop
    # the same partition at once.
    locked = connection.execute(
        "SELECT pg_try_advisory_lock(hashtext('audit-retention'))"
    ).fetchone()[0]
    if not locked:
        report.rejected = DropRejected(
            "", "another retention run is in progress: let it finish"
        )
        log.error("audit.retention_busy", reason=report.rejected.reason)

        return report
    expired = [p for p in month_partitions(connection) if p.upper <= cutoff]
    log.info(
        "audit.retention_started",
        retention_months=months,
        cutoff=chain.utc_text(cutoff),
        expired_partitions=len(expired),
        dry_run=dry_run,
    )
    simulated = DryRunState() if dry_run else None
    for partition in expired:
        started = time.perf_counter()
        try:
            spans = check_partition(connection, partition, keys, simulated)
            checked = time.perf_counter()
            if simulated is not None:
                simulated.record(partition, spans)
            else:
                drop_partition(connection, partition, spans)
        except DropRejected as rejected:
            log.error(
                "audit.partition_drop_rejected",
                partition=rejected.partition,
                chain_id=str(rejected.chain_id or ""),
                seq=rejected.seq,
                event_id=rejected.event_id,
                reason=rejected.reason,
            )
            report.rejected = rejected
            break
        report.dropped.append(
            {
                "partition": partition.name,
                "rows": sum(span.rows for span in spans.values()),
                "cuts": [
                    {
                        "chainId": str(span.chain_id),
                        "lastRemovedSeq": span.last_seq,
                    }
                    for span in spans.values()
                ],
            }
        )
        log.info(
            "audit.partition_checked"
            if dry_run
            else "audit.partition_dropped",
            partition=partition.name,
            chains=len(spans),
            rows=report.dropped[-1]["rows"],
            check_ms=round((checked - started) * 1000),
            drop_ms=round((time.perf_counter() - checked) * 1000),
        )
    deleted_ids = 0 if dry_run else delete_dropped_request_ids(connection)
    log.info(
        "audit.retention_finished",
        dropped=0 if dry_run else len(report.dropped),
        request_ids_deleted=deleted_ids,
        rejected_partition=report.rejected.partition
        if report.rejected
        else "",
    )

    return report


@dataclass(frozen=True)
class RetentionConfig:
    database_url: str
    retention_months: int
    # Every public key whose checkpoints count: the audit service's current
    # signing key and the keys it used before a rotation.
    trusted_keys: dict[str, Ed25519PublicKey]

    @classmethod
    def from_env(cls, env: Environment) -> "RetentionConfig":
        keys = {}
        paths = env.text("ARXIO_AUDIT_TRUSTED_KEYS").split(",")
        for path in filter(None, (path.strip() for path in paths)):
            try:
                pem = Path(path).read_bytes()
            except OSError as error:
                raise ConfigError(
                    f"ARXIO_AUDIT_TRUSTED_KEYS: {path!r} cannot be read "
                    f"({error.strerror}): list the audit service's public "
                    "key files (make run writes .run/audit-signing.pub)"
                ) from None
            try:
                key = chain.load_public_key(pem)
            except ValueError as error:
                raise ConfigError(
                    f"ARXIO_AUDIT_TRUSTED_KEYS: {path!r} is not an Ed25519 "
                    f"public key in PEM: {error}"
                ) from None
            keys[chain.public_key_id(key)] = key

        return cls(
            database_url=env.text("DATABASE_URL"),
            retention_months=env.integer(
                "ARXIO_AUDIT_RETENTION_MONTHS",
                DEFAULT_RETENTION_MONTHS,
                minimum=1,
                maximum=MAX_RETENTION_MONTHS,
            ),
            trusted_keys=keys,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.audit.retention",
        description="Drop the monthly partitions of the audit trail that "
        "are older than ARXIO_AUDIT_RETENTION_MONTHS whole months. Prints "
        "a JSON report and exits with code 3 when a partition may not be "
        "dropped.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check and report what would be dropped, but drop "
        "nothing",
    )
    args = parser.parse_args(argv)
    configure_logging("audit-retention")
    try:
        config = RetentionConfig.from_env(Environment())
        check_sslmode(config.database_url)
    except ConfigError as error:
        log.error("audit.retention_config_invalid", error=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with psycopg.connect(config.database_url, autocommit=True) as conn:
            report = run_retention(
                conn,
                config.retention_months,
                config.trusted_keys,
                datetime.datetime.now(datetime.UTC),
                dry_run=args.dry_run,
            )
    except psycopg.Error as error:
        log.error(
            "audit.retention_failed",
            error=type(error).__name__,
            sqlstate=error.sqlstate or "",
            message=str(error)[:300],
        )
        print(f"error: the retention job failed: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json(), indent=2))

    return EXIT_REJECTED if report.rejected else 0


if __name__ == "__main__":
    sys.exit(main())
