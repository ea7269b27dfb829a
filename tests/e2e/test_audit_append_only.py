"""The trail's database rejects what would otherwise be left for the
verifier to find: a row at a seq that its chain has already, a row that
does not extend its chain, and TRUNCATE of a month's partition. The
ingester's batches and the retention job's drops still work."""

import dataclasses
import datetime
import threading
import uuid

import psycopg
import pytest

from services.audit import chain, store
from services.common import db
from services.common.migrations import OWNER_ROLE, service_role
from tests.e2e import test_audit_retention
from tests.e2e.test_audit_retention import (
    ENTRIES_PER_MONTH,
    close_months,
    ingest,
    month_times,
    months_ago,
    partition_name,
    partitions,
    run_job,
    verify_stored,
)

pytestmark = pytest.mark.e2e

# PostgreSQL alone, migrated, with a checkpoint-signing key.
database = test_audit_retention.database

_COLUMNS = (
    "event_id, time, chain_id, seq, org_id, key_id, action, resource_type,"
    " method, endpoint, status_code, grpc_status, response_time_ms,"
    " request_id, client_address, prev_hash, hash, record_time"
)


@dataclasses.dataclass(frozen=True)
class Row:
    """An entry as audit.events stores it: the entry and its record_time."""

    entry: chain.Entry
    record_time: datetime.datetime


def stored_row(admin_url: str, chain_id: str, seq: int) -> Row:
    with psycopg.connect(admin_url) as connection:
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM audit.events"
            " WHERE chain_id = %s AND seq = %s",
            (chain_id, seq),
        ).fetchone()
    fields = dict(zip(_COLUMNS.split(", "), row, strict=True))
    fields["org_id"] = str(fields["org_id"])
    fields["prev_hash"] = bytes(fields["prev_hash"])
    fields["hash"] = bytes(fields["hash"])
    record_time = fields.pop("record_time")

    return Row(chain.Entry(**fields), record_time)


def linked_row(previous: Row, **changes) -> Row:
    """Build the row after `previous`, with a hash that recomputes.

    `changes` overrides entry fields (seq and prev_hash among them) and
    `record_time`.
    """
    record_time = changes.pop(
        "record_time", previous.record_time + datetime.timedelta(seconds=1)
    )
    fields = dataclasses.asdict(previous.entry)
    del fields["hash"]
    fields |= {
        "event_id": uuid.uuid4(),
        "time": record_time,
        "seq": previous.entry.seq + 1,
        "prev_hash": previous.entry.hash,
        "request_id": str(uuid.uuid4()),
    }
    fields |= changes

    return Row(chain.link_entry(**fields), record_time)


def later_record_time(previous: Row) -> datetime.datetime:
    """Return a record_time two seconds after `previous`, one after the
    default of `linked_row`: the unique index on (chain_id, seq,
    record_time) would reject a second row with the same one, before the
    trigger is reached."""
    return previous.record_time + datetime.timedelta(seconds=2)


def insert_rows(
    connection: psycopg.Connection,
    rows: list[Row],
    table: str = "audit.events",
) -> None:
    """Insert `rows` into `table`, audit.events or one of its partitions,
    in one statement, as the ingester does."""
    values = ", ".join("(" + ", ".join(["%s"] * 18) + ")" for _ in rows)
    parameters = []
    for row in rows:
        entry = row.entry
        parameters += [getattr(entry, name) for name in entry.hashed_fields()]
        parameters += [entry.hash, row.record_time]
    connection.execute(
        f"INSERT INTO {table} ({_COLUMNS}) VALUES {values}", parameters
    )


def insert_as_service(admin_url: str, rows: list[Row]) -> None:
    """Insert `rows` as the audit service's role, and commit."""
    audit_url = db.with_user(admin_url, service_role("audit"))
    with psycopg.connect(audit_url) as connection:
        insert_rows(connection, rows)


def ingest_now(database, org_id: str) -> None:
    """Store one entry of the current time through the ingester."""
    now = datetime.datetime.now(datetime.UTC)
    ingest(database.url, database.folder, org_id, [now])


@pytest.fixture
def three_entries(database):
    """A chain of three entries stored by the ingester; return its id and
    its head row."""
    org_id = str(uuid.uuid4())
    now = datetime.datetime.now(datetime.UTC)
    times = [now - datetime.timedelta(seconds=s) for s in (30, 20, 10)]
    ingest(database.url, database.folder, org_id, times)

    return org_id, stored_row(database.url, org_id, 3)


class TestChainHead:
    @pytest.mark.parametrize("seq", [2, 3])
    def test_repeated_seq_rejected(self, database, three_entries, seq):
        """A row that links like the genuine entry at its seq, filed under
        another record_time, is rejected."""
        org_id, _ = three_entries
        genuine = stored_row(database.url, org_id, seq)
        before = stored_row(database.url, org_id, seq - 1)
        forged = linked_row(
            before,
            status_code=500,
            record_time=genuine.record_time + datetime.timedelta(seconds=1),
        )

        with pytest.raises(psycopg.errors.UniqueViolation) as raised:
            insert_as_service(database.url, [forged])

        assert f"another entry at seq {seq}" in str(raised.value)
        assert str(forged.entry.event_id) in str(raised.value)

    def test_repeat_within_statement_rejected(self, database, three_entries):
        _, head = three_entries
        first = linked_row(head)
        second = linked_row(
            head, status_code=500, record_time=later_record_time(head)
        )

        with pytest.raises(psycopg.errors.UniqueViolation) as raised:
            insert_as_service(database.url, [first, second])

        assert "another entry at seq 4" in str(raised.value)

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"seq": 5}, "no entry at seq 4"),
            ({"prev_hash": bytes(32)}, "prev_hash is not the hash"),
            (
                {
                    "record_time": datetime.datetime(
                        2000, 1, 1, tzinfo=datetime.UTC
                    )
                },
                "record_time is earlier",
            ),
        ],
    )
    def test_row_off_head_rejected(
        self, database, three_entries, changes, reason
    ):
        _, head = three_entries
        if "record_time" in changes:
            # A partition for the early record_time, so that only the
            # trigger can reject the row.
            with psycopg.connect(database.url) as connection:
                connection.execute(
                    "SELECT audit.ensure_month_partition(%s)",
                    (changes["record_time"].date(),),
                )
        row = linked_row(head, **changes)

        with pytest.raises(psycopg.errors.CheckViolation) as raised:
            insert_as_service(database.url, [row])

        assert reason in str(raised.value)

    def test_new_chain_must_start_at_one(self, database):
        org_id = str(uuid.uuid4())
        ingest_now(database, org_id)
        first = stored_row(database.url, org_id, 1)
        other = uuid.uuid4()
        at_two = linked_row(first, chain_id=other, org_id=str(other))

        with pytest.raises(psycopg.errors.CheckViolation):
            insert_as_service(database.url, [at_two])

    def test_linked_rows_accepted(self, database, three_entries):
        """Rows that extend the head are stored, and the ingester numbers
        its next entry after them."""
        org_id, head = three_entries
        fourth = linked_row(head)
        fifth = linked_row(fourth)

        insert_as_service(database.url, [fourth, fifth])
        ingest_now(database, org_id)

        result = verify_stored(database.url, database.key, org_id)
        assert result.intact, result.problems
        assert 6 == result.last_seq
        assert 6 == result.unsigned_entries

    @pytest.mark.parametrize("new_chain", [False, True])
    def test_concurrent_repeat_rejected(
        self, database, three_entries, new_chain
    ):
        """Of two transactions that add a row at the same seq, the second
        waits for the first and fails when it commits."""
        _, head = three_entries
        if new_chain:
            chain_id = uuid.uuid4()
            genesis = dataclasses.replace(
                head.entry, seq=0, hash=chain.GENESIS_HASH
            )
            head = Row(genesis, head.record_time)
            rows = [
                linked_row(head, chain_id=chain_id, org_id=str(chain_id)),
                linked_row(
                    head,
                    chain_id=chain_id,
                    org_id=str(chain_id),
                    record_time=later_record_time(head),
                ),
            ]
        else:
            rows = [
                linked_row(head),
                linked_row(
                    head, status_code=500, record_time=later_record_time(head)
                ),
            ]
        audit_url = db.with_user(database.url, service_role("audit"))
        errors: list[Exception] = []
        with psycopg.connect(audit_url) as first:
            insert_rows(first, [rows[0]])

            def insert_second() -> None:
                try:
                    insert_as_service(database.url, [rows[1]])
                except psycopg.Error as error:
                    errors.append(error)

            second = threading.Thread(target=insert_second)
            second.start()
            second.join(timeout=1.0)
            assert second.is_alive(), "the second insert did not wait"
            first.commit()
            second.join(timeout=30.0)

        [error] = errors
        assert isinstance(error, psycopg.errors.UniqueViolation)

    def test_partition_insert_denied(self, database, three_entries):
        """The service role cannot insert into a partition directly, past
        the trigger on audit.events."""
        _, head = three_entries
        with psycopg.connect(database.url) as connection:
            partition = connection.execute(
                "SELECT tableoid::regclass::text FROM audit.events"
                " WHERE event_id = %s",
                (head.entry.event_id,),
            ).fetchone()[0]
        audit_url = db.with_user(database.url, service_role("audit"))

        with psycopg.connect(audit_url) as connection:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(
                    f"INSERT INTO {partition} SELECT * FROM audit.events"
                    " LIMIT 0"
                )

    def test_chain_continues_after_full_drop(self, database):
        """A chain whose every entry the retention job dropped goes on
        from its last seq, and verifies from the cut."""
        org_id = str(uuid.uuid4())
        old = months_ago(16)
        ingest(database.url, database.folder, org_id, month_times(old))
        close_months(database.url, database.key, [old])
        code, report, _ = run_job(database.url, database.public_key)
        assert 0 == code, report

        ingest_now(database, org_id)

        result = verify_stored(database.url, database.key, org_id)
        assert result.intact, result.problems
        assert ENTRIES_PER_MONTH + 1 == result.first_seq
        assert 1 == result.unsigned_entries


class TestChainRead:
    def test_pages_keep_rows_at_one_seq(
        self, database, three_entries, monkeypatch
    ):
        """A page boundary between two rows at one seq skips neither, so
        the verifier reads the row that the superuser added."""
        org_id, _ = three_entries
        genuine = stored_row(database.url, org_id, 2)
        before = stored_row(database.url, org_id, 1)
        forged = linked_row(
            before, status_code=500, record_time=later_record_time(genuine)
        )
        with psycopg.connect(database.url) as connection:
            connection.execute("SET session_replication_role = replica")
            insert_rows(connection, [forged])
        monkeypatch.setattr(store, "_CHUNK", 2)

        result = verify_stored(database.url, database.key, org_id)

        assert 4 == result.entries_checked
        assert [("inserted", 2, str(forged.entry.event_id))] == [
            (p.kind, p.seq, p.event_id) for p in result.problems
        ]


def truncate_as(url: str, partition: str, role: str | None = None) -> None:
    """TRUNCATE `partition`, after SET ROLE `role` when given."""
    with psycopg.connect(url) as connection:
        if role is not None:
            connection.execute(f"SET ROLE {role}")
        connection.execute(f"TRUNCATE audit.{partition}")


def row_count(admin_url: str) -> int:
    with psycopg.connect(admin_url) as connection:
        return connection.execute(
            "SELECT count(*) FROM audit.events"
        ).fetchone()[0]


class TestPartitionTruncate:
    def test_truncate_rejected_for_every_role(self, database):
        """Partitions made by the migrations, before the TRUNCATE trigger
        existed, and by the ingester later, reject TRUNCATE from the
        superuser, the owner and each service's role."""
        org_id = str(uuid.uuid4())
        old = months_ago(20)
        ingest(database.url, database.folder, org_id, month_times(old))
        ingest_now(database, org_id)
        stored = row_count(database.url)
        months = [partition_name(old), partition_name(months_ago(0))]
        service_urls = {
            service: db.with_user(database.url, service_role(service))
            for service in ("audit", "auth", "billing", "cds")
        }

        for partition in months:
            for role in (None, OWNER_ROLE):
                with pytest.raises(
                    psycopg.errors.InsufficientPrivilege
                ) as raised:
                    truncate_as(database.url, partition, role)
                assert "append-only: TRUNCATE is rejected" in str(
                    raised.value
                ), role
            for url in service_urls.values():
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    truncate_as(url, partition)

        assert stored == row_count(database.url)

    def test_partition_delete_rejected_for_owner(self, database):
        org_id = str(uuid.uuid4())
        ingest_now(database, org_id)

        with psycopg.connect(database.url) as connection:
            connection.execute(f"SET ROLE {OWNER_ROLE}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                connection.execute(
                    f"DELETE FROM audit.{partition_name(months_ago(0))}"
                )

        assert "append-only: DELETE is rejected" in str(raised.value)

    def test_retention_drops_partition_with_trigger(self, database):
        org_id = str(uuid.uuid4())
        old, newer = months_ago(20), months_ago(19)
        for month in (old, newer):
            ingest(database.url, database.folder, org_id, month_times(month))
        close_months(database.url, database.key, [old, newer])
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            truncate_as(database.url, partition_name(old), OWNER_ROLE)

        code, report, _ = run_job(database.url, database.public_key)

        assert 0 == code, report
        assert {partition_name(old), partition_name(newer)}.isdisjoint(
            partitions(database.url)
        )
        result = verify_stored(database.url, database.key, org_id)
        assert result.intact, result.problems
