"""Measure filtered `GET /v1/audit` pages among a million entries of one
organization.

The script starts the suite on loopback ports (no model) and creates an
Enterprise organization. It loads `--entries` entries of it, spread over
the last 60 days, with COPY as the owner role, each entry linked into the
organization's SHA-256 chain in Python. It then sends each query
`--requests` times, one at a time, through the edge over one kept-alive
HTTPS connection, and times the same queries against the audit store
alone, without the edge, the auth check or gRPC.

    .venv/bin/python bench/audit_query.py [--entries N] [--requests N]
        [--explain] [--no-write]

It prints p50 and p99 in milliseconds and writes them into the "Audit
query" section of docs/benchmarks.md.
"""

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

# Run as a script from any folder: the shared helpers live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.audit_common import machine_rows, machine_table  # noqa: E402
from bench.common import (  # noqa: E402
    KeptAliveClient,
    percentile,
    run_folder,
    write_section,
)
from services.audit import chain  # noqa: E402
from services.audit.store import AuditStore, EventFilter  # noqa: E402
from services.common import db, pagination  # noqa: E402
from services.common.migrations import OWNER_ROLE  # noqa: E402
from services.launcher.processes import (  # noqa: E402
    free_port,
    stop_signals_interrupt,
)
from services.launcher.stack import Stack, StackSettings  # noqa: E402

SECTION_HEADING = "## Audit query"
TARGET_P99_MS = 50.0
PAGE_SIZE = 100
WARMUP_REQUESTS = 20
LOAD_DAYS = 60
# (action, method, endpoint, status code) with weights.
OUTCOMES = [
    (("cds.clinical_review", "POST", "/v1/cds/clinical-review", 200), 800),
    (("cds.clinical_review", "POST", "/v1/cds/clinical-review", 400), 80),
    (("cds.clinical_review", "POST", "/v1/cds/clinical-review", 429), 40),
    (("cds.clinical_review", "POST", "/v1/cds/clinical-review", 503), 19),
    (("cds.clinical_review", "POST", "/v1/cds/clinical-review", 500), 1),
    (("audit.list_audit_events", "GET", "/v1/audit", 200), 60),
]
# Share of entries per synthetic key id: key 0 is on a fifth of them.
KEY_WEIGHTS = [20, 30, 25, 15, 10]
COPY_COLUMNS = (
    "event_id, time, chain_id, seq, org_id, key_id, action, resource_type,"
    " method, endpoint, status_code, grpc_status, response_time_ms,"
    " request_id, client_address, prev_hash, hash"
)


@dataclass(frozen=True)
class Query:
    name: str
    parameters: dict[str, str]
    filters: EventFilter
    # Follow the first page's nextPageToken and time the second page.
    second_page: bool = False


@dataclass
class Timing:
    query: Query
    edge_ms: list[float] = field(default_factory=list)
    store_ms: list[float] = field(default_factory=list)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_queries(now: datetime.datetime) -> list[Query]:
    day_start = (now - datetime.timedelta(days=30)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    day_end = day_start + datetime.timedelta(days=1)
    review = "cds.clinical_review"

    return [
        Query("newest page, no filter", {}, EventFilter()),
        Query(
            "action (94 % of entries)",
            {"action": review},
            EventFilter(action=review),
        ),
        Query(
            "statusCode=429 (4 %)",
            {"statusCode": "429"},
            EventFilter(status_code=429),
        ),
        Query(
            "statusCode=429, second page",
            {"statusCode": "429"},
            EventFilter(status_code=429),
            second_page=True,
        ),
        Query(
            "statusCode=500 (0.1 %)",
            {"statusCode": "500"},
            EventFilter(status_code=500),
        ),
        Query(
            "keyId (20 %)",
            {"keyId": "key_bench0000"},
            EventFilter(key_id="key_bench0000"),
        ),
        Query(
            "one day, 30 days ago",
            {"startTime": rfc3339(day_start), "endTime": rfc3339(day_end)},
            EventFilter(start_time=day_start, end_time=day_end),
        ),
        Query(
            "one day + action + statusCode=400 + keyId",
            {
                "startTime": rfc3339(day_start),
                "endTime": rfc3339(day_end),
                "action": review,
                "statusCode": "400",
                "keyId": "key_bench0001",
            },
            EventFilter(
                start_time=day_start,
                end_time=day_end,
                action=review,
                status_code=400,
                key_id="key_bench0001",
            ),
        ),
    ]


def run_cli(stack: Stack, *arguments: str) -> dict:
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("arxio")), *arguments],
        env={
            "PATH": str(Path(sys.executable).parent),
            "ARXIO_EDGE_PORT": str(stack.edge_port),
            "ARXIO_CA_FILE": str(stack.certs_dir / "ca.crt"),
            "ARXIO_OPERATOR_TOKEN": stack.operator_token,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    return json.loads(completed.stdout)


def load_entries(
    admin_url: str, org_id: str, count: int, end: datetime.datetime
) -> float:
    """COPY `count` chained entries of `org_id`; return the seconds taken."""
    chooser = random.Random(7)
    chain_id = chain.chain_of(org_id)
    start = end - datetime.timedelta(days=LOAD_DAYS)
    step = (end - start) / count
    kinds = [kind for kind, _ in OUTCOMES]
    weights = [weight for _, weight in OUTCOMES]
    key_ids = [f"key_bench{index:04d}" for index in range(len(KEY_WEIGHTS))]
    started = time.perf_counter()
    with psycopg.connect(admin_url) as connection:
        connection.execute(f"SET ROLE {OWNER_ROLE}")
        day = start.date()
        while day <= end.date():
            connection.execute(
                "SELECT audit.ensure_month_partition(%s)", (day,)
            )
            day += datetime.timedelta(days=1)
        previous = chain.GENESIS_HASH
        # record_time, the partition key, is the running maximum of
        # `time` along the chain, which is `time` itself here because the
        # entries are generated in time order.
        copy_sql = (
            f"COPY audit.events ({COPY_COLUMNS}, record_time) FROM STDIN"
        )
        with connection.cursor().copy(copy_sql) as copy:
            for index in range(count):
                action, method, endpoint, status = chooser.choices(
                    kinds, weights
                )[0]
                entry = chain.link_entry(
                    event_id=uuid.uuid4(),
                    time=start + index * step,
                    chain_id=chain_id,
                    seq=index + 1,
                    org_id=org_id,
                    key_id=chooser.choices(key_ids, KEY_WEIGHTS)[0],
                    action=action,
                    resource_type=action.split(".", 1)[1],
                    method=method,
                    endpoint=endpoint,
                    status_code=status,
                    grpc_status=None,
                    response_time_ms=chooser.randrange(2, 80),
                    request_id=str(uuid.uuid4()),
                    client_address=f"10.1.0.{chooser.randrange(1, 250)}",
                    prev_hash=previous,
                )
                copy.write_row(
                    [getattr(entry, name) for name in _ENTRY_FIELDS]
                    + [entry.time]
                )
                previous = entry.hash
        connection.execute("ANALYZE audit.events")

    return time.perf_counter() - started


_ENTRY_FIELDS = [name.strip() for name in COPY_COLUMNS.split(",")]


def timed_get(
    client: KeptAliveClient, path: str, api_key: str, page_token: str = ""
) -> tuple[float, dict]:
    if page_token:
        path += "&pageToken=" + urllib.parse.quote(page_token)
    started = time.perf_counter()
    status, body = client.get(path, {"x-api-key": api_key})
    elapsed = (time.perf_counter() - started) * 1000
    if status != 200:
        raise RuntimeError(f"GET {path} returned {status}: {body[:300]!r}")

    return elapsed, json.loads(body)


def time_edge_floor(
    client: KeptAliveClient, api_key: str, requests: int
) -> list[float]:
    """Time `GET /v1/audit/{id}` of an unknown id: the edge, the auth check
    and one indexed lookup that finds nothing, so a floor for the pages."""
    path = f"/v1/audit/{uuid.uuid4()}"
    timings = []
    for index in range(WARMUP_REQUESTS + requests):
        started = time.perf_counter()
        status, body = client.get(path, {"x-api-key": api_key})
        elapsed = (time.perf_counter() - started) * 1000
        if status != 404:
            raise RuntimeError(f"GET {path} returned {status}: {body[:300]!r}")
        if index >= WARMUP_REQUESTS:
            timings.append(elapsed)

    return sorted(timings)


def time_edge(
    client: KeptAliveClient, api_key: str, timing: Timing, requests: int
) -> None:
    query = timing.query
    path = "/v1/audit?" + urllib.parse.urlencode(
        {"pageSize": str(PAGE_SIZE), **query.parameters}
    )
    for index in range(WARMUP_REQUESTS + requests):
        elapsed, page = timed_get(client, path, api_key)
        if query.second_page:
            elapsed, page = timed_get(
                client, path, api_key, page["nextPageToken"]
            )
        if not page.get("auditEvents"):
            raise RuntimeError(f"{query.name}: the page has no events")
        if index >= WARMUP_REQUESTS:
            timing.edge_ms.append(elapsed)


async def time_store(
    audit_url: str, org_id: str, timings: list[Timing], requests: int
) -> None:
    """Time AuditStore.list_events alone: SQL, row-level security, rows."""
    engine = db.create_engine(audit_url, pool_size=2)
    store = AuditStore(db.session_factory(engine))
    try:
        for timing in timings:
            before = None
            if timing.query.second_page:
                first = await store.list_events(
                    org_id, PAGE_SIZE + 1, None, timing.query.filters
                )
                last = first[PAGE_SIZE - 1]
                before = pagination.decode_token(
                    pagination.encode_token(last.time, str(last.event_id))
                )
            for index in range(WARMUP_REQUESTS + requests):
                started = time.perf_counter()
                await store.list_events(
                    org_id, PAGE_SIZE + 1, before, timing.query.filters
                )
                elapsed = (time.perf_counter() - started) * 1000
                if index >= WARMUP_REQUESTS:
                    timing.store_ms.append(elapsed)
    finally:
        await engine.dispose()


def first_page_sql(org_id: str, query: Query) -> tuple[str, dict]:
    """Return the SELECT of a query's first page and its parameters, as
    `AuditStore.list_events` builds them, for psycopg."""
    where = ["org_id = %(org)s"]
    filters = query.filters
    if filters.start_time:
        where.append("time >= %(start)s")
    if filters.end_time:
        where.append("time < %(end)s")
    if filters.action:
        where.append("action = %(action)s")
    if filters.status_code:
        where.append("status_code = %(status)s")
    if filters.key_id:
        where.append("key_id = %(key)s")
    sql = (
        "SELECT * FROM audit.events WHERE "
        + " AND ".join(where)
        + " ORDER BY time DESC, event_id DESC LIMIT %(limit)s"
    )
    parameters = {
        "org": org_id,
        "start": filters.start_time,
        "end": filters.end_time,
        "action": filters.action,
        "status": filters.status_code,
        "key": filters.key_id,
        "limit": PAGE_SIZE + 1,
    }

    return sql, parameters


def explain(audit_url: str, org_id: str, query: Query) -> str:
    """Return PostgreSQL's plan of a query's first page, run as the audit
    service's role, with the times it measured."""
    sql, parameters = first_page_sql(org_id, query)
    with psycopg.connect(audit_url) as connection:
        connection.execute(
            "SELECT set_config('arxio.org_id', %s, true)", (org_id,)
        )
        rows = connection.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + sql, parameters
        ).fetchall()

    return "\n".join(row[0] for row in rows)


def render_section(
    timings: list[Timing],
    floor: list[float],
    entries: int,
    load_seconds: float,
    requests: int,
    machine: list[tuple[str, str]],
) -> str:
    worst = max(percentile(sorted(t.edge_ms), 0.99) for t in timings)
    met = "yes" if worst < TARGET_P99_MS else "no"
    lines = [
        SECTION_HEADING,
        "",
        f"`GET /v1/audit?pageSize={PAGE_SIZE}` with filters, among "
        f"{entries:,} entries of one organization spread over the last "
        f"{LOAD_DAYS} days, newest first. Measured by `bench/audit_query.py` "
        "(`make bench-audit`) on a suite started on loopback ports. Each "
        f"query runs {requests} times after {WARMUP_REQUESTS} warm-up "
        "requests, one at a time, over one kept-alive HTTPS connection "
        "through the edge: TLS, the auth check with its database reads and "
        "quota update, JSON transcoding and the audit service. Each "
        "filter column has an index on (organization, column, time), from "
        "the audit migration 0004. The store column "
        "times `AuditStore.list_events` alone on the same database. Every "
        "request is itself audited, so the ingester writes meanwhile. The "
        f"target is a p99 under {TARGET_P99_MS:g} ms through the edge; "
        f"met: {met}.",
        "",
        "| Query | Edge p50 | Edge p99 | Store p50 | Store p99 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for timing in timings:
        edge = sorted(timing.edge_ms)
        store = sorted(timing.store_ms)
        lines.append(
            f"| {timing.query.name} | {percentile(edge, 0.5):.1f} ms | "
            f"{percentile(edge, 0.99):.1f} ms | "
            f"{percentile(store, 0.5):.1f} ms | "
            f"{percentile(store, 0.99):.1f} ms |"
        )
    lines += [
        "",
        "For comparison, `GET /v1/audit/{eventId}` of an unknown id passes "
        "the same edge, auth check and service but reads one index entry. "
        f"It took p50 {percentile(floor, 0.5):.1f} ms and p99 "
        f"{percentile(floor, 0.99):.1f} ms, so the rest of a page's time "
        "is the query and the page itself.",
        "",
        f"Loading the {entries:,} entries (chaining in Python and COPY) "
        f"took {load_seconds:.0f} s.",
        "",
        *machine_table(machine),
    ]

    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--entries",
        type=int,
        default=1_000_000,
        help="entries of the organization (default: %(default)s)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=300,
        help="timed requests per query (default: %(default)s)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print PostgreSQL's plan of each query's first page",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="do not update docs/benchmarks.md",
    )
    args = parser.parse_args()
    if args.entries < 10 * PAGE_SIZE or args.requests < 1:
        parser.error(
            f"--entries must be at least {10 * PAGE_SIZE}, --requests at "
            "least 1"
        )

    load_at_start = os.getloadavg()[0]
    run_dir = run_folder("bench-query-")
    stack = Stack(
        StackSettings(
            run_dir=run_dir,
            edge_port=0,
            log_to_files=True,
            # No model: the benchmark sends no review.
            ollama_host=f"http://127.0.0.1:{free_port()}",
            # The checkpointer would verify the million entries meanwhile.
            checkpoint_seconds=3600.0,
        )
    )
    try:
        stack.start()
        org = run_cli(
            stack, "orgs", "create", "--name", "Bench", "--plan", "enterprise"
        )
        api_key = run_cli(stack, "keys", "create", "--org", org["orgId"])[
            "apiKey"
        ]
        now = datetime.datetime.now(datetime.UTC)
        load_seconds = load_entries(
            stack.admin_database_url,
            org["orgId"],
            args.entries,
            now - datetime.timedelta(minutes=1),
        )
        print(f"loaded {args.entries} entries in {load_seconds:.1f} s")
        timings = [Timing(query) for query in build_queries(now)]
        client = KeptAliveClient(stack.edge_port, stack.certs_dir / "ca.crt")
        try:
            floor = time_edge_floor(client, api_key, args.requests)
            for timing in timings:
                time_edge(client, api_key, timing, args.requests)
        finally:
            client.close()
        audit_url = stack.database_urls["audit"]
        asyncio.run(
            time_store(audit_url, org["orgId"], timings, args.requests)
        )
        if args.explain:
            for timing in timings:
                print(f"\n{timing.query.name}:")
                print(explain(audit_url, org["orgId"], timing.query))
        machine = machine_rows(stack.admin_database_url, load_at_start)
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    print(
        f"unknown event id (404): edge p50 {percentile(floor, 0.5):.1f} ms, "
        f"p99 {percentile(floor, 0.99):.1f} ms"
    )
    for timing in timings:
        edge = sorted(timing.edge_ms)
        store = sorted(timing.store_ms)
        print(
            f"{timing.query.name}: edge p50 {percentile(edge, 0.5):.1f} ms, "
            f"p99 {percentile(edge, 0.99):.1f} ms; store p50 "
            f"{percentile(store, 0.5):.1f} ms, p99 "
            f"{percentile(store, 0.99):.1f} ms"
        )
    if not args.no_write:
        write_section(
            SECTION_HEADING,
            render_section(
                timings,
                floor,
                args.entries,
                load_seconds,
                args.requests,
                machine,
            ),
        )
        print(f"wrote the {SECTION_HEADING!r} section of docs/benchmarks.md")

    return 0


if __name__ == "__main__":
    # SIGTERM and SIGHUP stop the suite through main's cleanup, as Ctrl-C does.
    with stop_signals_interrupt():
        status = main()
    sys.exit(status)
