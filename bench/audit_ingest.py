"""Measure how fast the audit ingester stores the edge's access-log lines.

Both runs use one private embedded PostgreSQL and the ingester's own code,
`AuditIngester.store`: each batch of lines is parsed, linked into its
organization's hash chain and inserted, and the file offset is committed
in the same transaction.

- batched: batches of up to `MAX_BATCH_LINES` lines, as the ingester reads
  them, so one transaction and one multi-row INSERT per batch;
- row by row: the same code with one line per batch, so every entry is its
  own INSERT, transaction and commit.

    .venv/bin/python bench/audit_ingest.py [--lines N] [--row-lines N]
        [--orgs N] [--profile] [--no-write]

The script prints entries a second for both and writes them into the
"Audit ingest" section of docs/benchmarks.md.
"""

import argparse
import asyncio
import cProfile
import datetime
import io
import json
import math
import os
import pstats
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

# Run as a script from any folder: the shared helpers live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.audit_common import (  # noqa: E402
    machine_rows,
    machine_table,
    private_database,
    server_cpu_seconds,
)
from bench.common import run_folder, write_section  # noqa: E402
from services.audit.ingest import (  # noqa: E402
    MAX_BATCH_LINES,
    AuditIngester,
    file_id,
    read_batch,
)
from services.common import db  # noqa: E402
from services.common.migrations import service_role  # noqa: E402

SECTION_HEADING = "## Audit ingest"
TARGET_ENTRIES_PER_SECOND = 5000
# Outcomes of the generated requests, with their weights.
OUTCOMES = [
    (("POST", "/v1/cds/clinical-review", "200"), 80),
    (("POST", "/v1/cds/clinical-review", "400"), 8),
    (("POST", "/v1/cds/clinical-review", "429"), 4),
    (("GET", "/v1/audit", "200"), 6),
    (("POST", "/v1/cds/clinical-review", "401"), 2),
]


def access_log_lines(count: int, orgs: int, seed: int = 1) -> list[str]:
    """Build `count` access-log lines as the edge writes them.

    Requests of `orgs` organizations, one key each, over the last hour;
    401s carry no organization, as the edge logs them.
    """
    chooser = random.Random(seed)
    org_ids = [
        str(uuid.UUID(int=chooser.getrandbits(128))) for _ in range(orgs)
    ]
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    step = datetime.timedelta(hours=1) / count
    kinds = [kind for kind, _ in OUTCOMES]
    weights = [weight for _, weight in OUTCOMES]
    lines = []
    for index in range(count):
        method, path, status = chooser.choices(kinds, weights)[0]
        org = chooser.randrange(orgs)
        authenticated = status != "401"
        lines.append(
            json.dumps(
                {
                    "time": (start + index * step).strftime(
                        "%Y-%m-%dT%H:%M:%S.%fZ"
                    ),
                    "request_id": str(uuid.uuid4()),
                    "method": method,
                    "path": path,
                    "content_type": "application/json",
                    "status": status,
                    "grpc_status": "-",
                    "duration_ms": str(chooser.randrange(2, 60)),
                    "client": f"10.0.{org % 250}.{chooser.randrange(1, 250)}",
                    "org_id": org_ids[org] if authenticated else "-",
                    "key_id": f"key_bench{org:04d}" if authenticated else "-",
                    "action": "-",
                    "resource_type": "-",
                }
            )
        )

    return lines


@dataclass
class IngestRun:
    path: str
    entries: int
    transactions: int
    seconds: float
    # Seconds spent reading and parsing lines, outside the transactions.
    read_seconds: float
    # CPU seconds of this process (the ingester) and of PostgreSQL.
    ingester_cpu: float
    database_cpu: float
    # Milliseconds of each transaction: reading the batch, then storing it.
    transaction_ms: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.entries / self.seconds

    @property
    def per_cpu_second(self) -> float:
        """Entries per CPU second of the ingester and PostgreSQL together,
        which other load on the machine changes less than wall time."""
        return self.entries / (self.ingester_cpu + self.database_cpu)


async def ingest_file(
    database_url: str,
    path: Path,
    batch_lines: int,
    label: str,
    max_seconds: float | None = None,
) -> IngestRun:
    """Store the lines of `path` in batches of `batch_lines` lines.

    With `max_seconds`, no batch starts after that many seconds, so the
    run may end before the file does.
    """
    engine = db.create_engine(
        db.with_user(database_url, service_role("audit")), pool_size=2
    )
    ingester = AuditIngester(db.session_factory(engine), path, label)
    current_file = file_id(path)
    size = path.stat().st_size
    offset = entries = transactions = 0
    read_seconds = 0.0
    transaction_ms = []
    try:
        database_cpu = server_cpu_seconds(database_url)
        ingester_cpu = time.process_time()
        started = time.perf_counter()
        stop = math.inf if max_seconds is None else started + max_seconds
        while offset < size and time.perf_counter() < stop:
            read_started = time.perf_counter()
            batch = read_batch(path, offset, batch_lines)
            read_seconds += time.perf_counter() - read_started
            await ingester.store(batch, current_file)
            transaction_ms.append((time.perf_counter() - read_started) * 1000)
            offset = batch.end
            entries += len(batch.rows)
            transactions += 1
        seconds = time.perf_counter() - started
        ingester_cpu = time.process_time() - ingester_cpu
        database_cpu = server_cpu_seconds(database_url) - database_cpu
    finally:
        await engine.dispose()

    return IngestRun(
        label,
        entries,
        transactions,
        seconds,
        read_seconds,
        ingester_cpu,
        database_cpu,
        transaction_ms,
    )


def stored_entries(database_url: str) -> int:
    with psycopg.connect(database_url) as connection:
        return connection.execute(
            "SELECT count(*) FROM audit.events"
        ).fetchone()[0]


def render_section(
    runs: list[IngestRun], machine: list[tuple[str, str]]
) -> str:
    batched, row_by_row = runs
    met = "yes" if batched.per_second >= TARGET_ENTRIES_PER_SECOND else "no"
    lines = [
        SECTION_HEADING,
        "",
        "Access-log lines stored into `audit.events` by the audit "
        "ingester's own code (`AuditIngester.store`), measured by "
        "`bench/audit_ingest.py` (`make bench-audit`) against a private "
        "embedded PostgreSQL on the same machine, over its Unix socket. "
        "Each line is parsed, linked into its organization's SHA-256 chain "
        "and inserted, and the file offset commits in the same "
        "transaction. Both runs are in one process, one after the other, "
        "on the same database. The target is at least "
        f"{TARGET_ENTRIES_PER_SECOND:,} entries a second with batched "
        f"writes; met: {met}.",
        "",
        "| Path | Entries | Transactions | Seconds | Entries a second | "
        "CPU seconds, ingester + PostgreSQL | Entries a CPU second |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {run.path} | {run.entries:,} | {run.transactions:,} | "
            f"{run.seconds:.1f} | {run.per_second:,.0f} | "
            f"{run.ingester_cpu:.1f} + {run.database_cpu:.1f} | "
            f"{run.per_cpu_second:,.0f} |"
        )
    speedup = batched.per_second / row_by_row.per_second
    lines += [
        "",
        f"Batched writes store {speedup:.0f} times as many entries a "
        "second as row-by-row writes. Of the "
        f"batched run's {batched.seconds:.1f} s, reading and parsing the "
        f"file took {batched.read_seconds:.1f} s; the rest is chaining, "
        "the INSERT and the commit. Wall time includes waiting for a CPU "
        "while other processes run; entries a CPU second does not, so it "
        "is the better figure to compare between runs. Row-by-row writes "
        "also wait for a WAL flush at each commit (fsync and "
        "synchronous_commit are on).",
        "",
        *machine_table(machine),
    ]

    return "\n".join(lines) + "\n"


def print_profile(profiler: cProfile.Profile) -> None:
    output = io.StringIO()
    stats = pstats.Stats(profiler, stream=output)
    stats.sort_stats("tottime").print_stats(20)
    print(output.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lines",
        type=int,
        default=100_000,
        help="lines of the batched run (default: %(default)s)",
    )
    parser.add_argument(
        "--row-lines",
        type=int,
        default=3000,
        help="lines of the row-by-row run (default: %(default)s)",
    )
    parser.add_argument(
        "--orgs",
        type=int,
        default=20,
        help="organizations, so chains, in the lines (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a cProfile of the batched run, by own time",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="do not update docs/benchmarks.md",
    )
    args = parser.parse_args()
    if min(args.lines, args.row_lines, args.orgs) < 1:
        parser.error("--lines, --row-lines and --orgs must be at least 1")

    load_at_start = os.getloadavg()[0]
    folder = run_folder("bench-ingest-")
    try:
        with private_database() as database_url:
            row_file = folder / "row-by-row.log"
            row_file.write_text(
                "\n".join(access_log_lines(args.row_lines, args.orgs, seed=2))
                + "\n"
            )
            batched_file = folder / "batched.log"
            batched_file.write_text(
                "\n".join(access_log_lines(args.lines, args.orgs)) + "\n"
            )
            row_by_row = asyncio.run(
                ingest_file(database_url, row_file, 1, "row by row")
            )
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            batched = asyncio.run(
                ingest_file(
                    database_url,
                    batched_file,
                    MAX_BATCH_LINES,
                    f"batched (up to {MAX_BATCH_LINES:,} lines a transaction)",
                )
            )
            if profiler is not None:
                profiler.disable()
            stored = stored_entries(database_url)
            machine = machine_rows(database_url, load_at_start)
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()

    if stored != args.lines + args.row_lines:
        print(
            f"error: {stored} entries stored, expected "
            f"{args.lines + args.row_lines}",
            file=sys.stderr,
        )
        return 1
    runs = [batched, row_by_row]
    for run in runs:
        print(
            f"{run.path}: {run.entries} entries in {run.seconds:.2f} s, "
            f"{run.per_second:,.0f} a second ({run.transactions} "
            f"transactions, {run.read_seconds:.2f} s reading); CPU "
            f"{run.ingester_cpu:.2f} s ingester + {run.database_cpu:.2f} s "
            f"PostgreSQL, {run.per_cpu_second:,.0f} entries a CPU second"
        )
    if profiler is not None:
        print_profile(profiler)
    if not args.no_write:
        write_section(SECTION_HEADING, render_section(runs, machine))
        print(f"wrote the {SECTION_HEADING!r} section of docs/benchmarks.md")

    return 0


if __name__ == "__main__":
    sys.exit(main())
