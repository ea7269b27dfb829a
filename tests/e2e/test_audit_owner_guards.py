"""The owner role, without superuser, can neither move a chain's head by
hand nor insert past the chain check by naming a partition. A retention
cut that it fakes at a recent month end fails verification."""

import datetime
import uuid

import psycopg
import pytest

from services.common.migrations import OWNER_ROLE
from tests.e2e import test_audit_append_only, test_audit_retention
from tests.e2e.test_audit_append_only import (
    Row,
    ingest_now,
    insert_as_service,
    insert_rows,
    linked_row,
    stored_row,
)
from tests.e2e.test_audit_retention import (
    ENTRIES_PER_MONTH,
    close_months,
    ingest,
    month_times,
    months_ago,
    partition_name,
    verify_stored,
)

pytestmark = pytest.mark.e2e

database = test_audit_retention.database
three_entries = test_audit_append_only.three_entries


def owner_connection(admin_url: str) -> psycopg.Connection:
    """Connect as the superuser and switch to the owner role."""
    connection = psycopg.connect(admin_url)
    connection.execute(f"SET ROLE {OWNER_ROLE}")

    return connection


def partition_of(admin_url: str, row: Row) -> str:
    with psycopg.connect(admin_url) as connection:
        return connection.execute(
            "SELECT tableoid::regclass::text FROM audit.events"
            " WHERE event_id = %s",
            (row.entry.event_id,),
        ).fetchone()[0]


def stored_head(admin_url: str, chain_id: str) -> tuple[int, bytes]:
    with psycopg.connect(admin_url) as connection:
        seq, hash_value = connection.execute(
            "SELECT seq, hash FROM audit.head_entries WHERE chain_id = %s",
            (chain_id,),
        ).fetchone()

    return seq, bytes(hash_value)


class TestHeadEntries:
    @pytest.mark.parametrize(
        "statement",
        [
            "DELETE FROM audit.head_entries WHERE chain_id = %(chain)s",
            "TRUNCATE audit.head_entries",
        ],
    )
    def test_head_removal_rejected(self, database, three_entries, statement):
        org_id, _ = three_entries
        parameters = {"chain": org_id} if "%(chain)s" in statement else None

        with owner_connection(database.url) as connection:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                connection.execute(statement, parameters)

        assert "head_entries is append-only" in str(raised.value)
        assert 3 == stored_head(database.url, org_id)[0]

    @pytest.mark.parametrize(
        "assignment", ["seq = 1", "seq = seq + 1", "hash = %(hash)s"]
    )
    def test_head_update_by_hand_rejected(
        self, database, three_entries, assignment
    ):
        org_id, _ = three_entries
        before = stored_head(database.url, org_id)

        with owner_connection(database.url) as connection:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                connection.execute(
                    f"UPDATE audit.head_entries SET {assignment}"
                    " WHERE chain_id = %(chain)s",
                    {"chain": org_id, "hash": bytes(32)},
                )

        assert "heads move only when entries are inserted" in str(raised.value)
        assert before == stored_head(database.url, org_id)

    @pytest.mark.parametrize(
        ("assignment", "reason"),
        [
            ("seq = seq - 1", "from seq 3 to seq 2"),
            ("seq = seq + 1", "no entry with its hash"),
            ("hash = decode(repeat('00', 32), 'hex')", "moves only forward"),
        ],
    )
    def test_head_update_from_trigger_checked(
        self, database, three_entries, assignment, reason
    ):
        """An update from a trigger of the owner's, past the depth check,
        must still move the head forward to a stored entry."""
        org_id, _ = three_entries
        before = stored_head(database.url, org_id)
        with owner_connection(database.url) as connection:
            connection.execute("CREATE TABLE audit.head_moves (chain uuid)")
            connection.execute(
                "CREATE FUNCTION audit.move_head() RETURNS trigger"
                " LANGUAGE plpgsql AS $$ BEGIN"
                f" UPDATE audit.head_entries SET {assignment}"
                " WHERE chain_id = NEW.chain; RETURN NEW; END $$"
            )
            connection.execute(
                "CREATE TRIGGER move_head AFTER INSERT ON audit.head_moves"
                " FOR EACH ROW EXECUTE FUNCTION audit.move_head()"
            )
            with pytest.raises(psycopg.errors.CheckViolation) as raised:
                connection.execute(
                    "INSERT INTO audit.head_moves VALUES (%s)", (org_id,)
                )

        assert reason in str(raised.value)
        assert before == stored_head(database.url, org_id)

    def test_head_insert_by_hand_rejected(self, database, three_entries):
        """A head for a chain without one, made up by the owner, would
        make the ingester continue that chain from it."""
        _, head = three_entries
        with owner_connection(database.url) as connection:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(
                    "INSERT INTO audit.head_entries"
                    " (chain_id, seq, hash, record_time)"
                    " VALUES (gen_random_uuid(), 7, %s, now())",
                    (head.entry.hash,),
                )

    def test_chain_continues_after_rejected_delete(
        self, database, three_entries
    ):
        """The ingester goes on from the head that the owner failed to
        delete, so the chain verifies."""
        org_id, _ = three_entries
        with owner_connection(database.url) as connection:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(
                    "DELETE FROM audit.head_entries WHERE chain_id = %s",
                    (org_id,),
                )

        ingest_now(database, org_id)

        result = verify_stored(database.url, database.key, org_id)
        assert result.intact, result.problems
        assert 4 == result.last_seq

    def test_headless_chain_restart_rejected(self, database, three_entries):
        """A chain with stored entries but no head, which only a superuser
        can leave behind, does not start again at seq 1."""
        org_id, head = three_entries
        with psycopg.connect(database.url) as connection:
            connection.execute("SET session_replication_role = replica")
            connection.execute(
                "DELETE FROM audit.head_entries WHERE chain_id = %s",
                (org_id,),
            )
        genesis = linked_row(head, seq=1, prev_hash=bytes(32))

        with pytest.raises(psycopg.errors.CheckViolation) as raised:
            insert_as_service(database.url, [genesis])

        assert "has no head for it" in str(raised.value)


class TestPartitionInsert:
    def test_repeated_seq_rejected(self, database, three_entries):
        """A copy of the entry at seq 2, with its request id, filed a
        second later in the same partition."""
        org_id, _ = three_entries
        genuine = stored_row(database.url, org_id, 2)
        before = stored_row(database.url, org_id, 1)
        copy = linked_row(
            before,
            request_id=genuine.entry.request_id,
            record_time=genuine.record_time + datetime.timedelta(seconds=1),
        )
        partition = partition_of(database.url, genuine)

        with owner_connection(database.url) as connection:
            with pytest.raises(psycopg.errors.UniqueViolation) as raised:
                insert_rows(connection, [copy], partition)

        assert "another entry at seq 2" in str(raised.value)

    def test_linked_row_moves_head(self, database, three_entries):
        """A row that extends the chain is accepted through the partition
        too, and the ingester numbers its next entry after it."""
        org_id, head = three_entries
        fourth = linked_row(head)
        with owner_connection(database.url) as connection:
            insert_rows(connection, [fourth], partition_of(database.url, head))

        assert (4, fourth.entry.hash) == stored_head(database.url, org_id)
        ingest_now(database, org_id)
        result = verify_stored(database.url, database.key, org_id)
        assert result.intact, result.problems
        assert 5 == result.last_seq

    def test_new_partition_checked(self, database, three_entries):
        """A partition that audit.ensure_month_partition creates later
        gets the check as well."""
        _, head = three_entries
        next_year = head.record_time + datetime.timedelta(days=366)
        with psycopg.connect(database.url) as connection:
            partition = connection.execute(
                "SELECT audit.ensure_month_partition(%s)",
                (next_year.date(),),
            ).fetchone()[0]
        repeat = linked_row(
            stored_row(database.url, head.entry.chain_id, 2),
            record_time=next_year,
        )

        with owner_connection(database.url) as connection:
            with pytest.raises(psycopg.errors.UniqueViolation):
                insert_rows(connection, [repeat], f"audit.{partition}")

    def test_parent_insert_checked_once(self, database, three_entries):
        """An insert through audit.events fires the check of the parent
        only, so the rows of a batch are not checked against themselves."""
        org_id, head = three_entries
        fourth = linked_row(head)
        fifth = linked_row(fourth)

        with psycopg.connect(database.url) as connection:
            insert_rows(connection, [fourth, fifth])

        assert (5, fifth.entry.hash) == stored_head(database.url, org_id)


class TestFakeRetentionCut:
    def test_recent_month_cut_reported(self, database):
        """The owner drops last month's partition and records a cut, as
        the retention job would after 12 months: verification reports the
        entries as deleted, though the cut is at a signed month end."""
        org_id = str(uuid.uuid4())
        last_month = months_ago(1)
        ingest(database.url, database.folder, org_id, month_times(last_month))
        close_months(database.url, database.key, [last_month])
        ingest_now(database, org_id)
        with owner_connection(database.url) as connection:
            connection.execute(
                f"DROP TABLE audit.{partition_name(last_month)}"
            )
            connection.execute(
                "INSERT INTO audit.retention_cuts"
                " (chain_id, last_removed_seq, partition_name)"
                " VALUES (%s, %s, %s)",
                (org_id, ENTRIES_PER_MONTH, partition_name(last_month)),
            )

        result = verify_stored(database.url, database.key, org_id)

        assert not result.intact
        [problem] = result.problems
        assert ("deleted", ENTRIES_PER_MONTH) == (problem.kind, problem.seq)
        assert f"at the end of {last_month:%Y-%m}" in problem.message
        assert 12 == result.retention_months
