"""The chained audit trail: verification catches every change, exports
verify offline, and queries filter and read single entries."""

import asyncio
import dataclasses
import datetime
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from services.audit import chain
from services.audit.checkpoints import Checkpointer
from services.audit.servicers import verify_stored_chain
from services.audit.store import AuditStore
from services.common import db
from services.common.migrations import service_role
from tests.e2e.test_audit import stored_rows
from tests.suite import cli_process

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}
WAIT = 30.0


def send_reviews(edge, org, count: int) -> list[str]:
    """Send reviews; return their request ids, in order."""
    key = {"x-api-key": org.api_key}

    return [
        edge.request("POST", REVIEW_PATH, RULES_ONLY, key).headers[
            "x-request-id"
        ]
        for _ in range(count)
    ]


def wait_for_checkpoint_at_head(stack, org_id: str) -> int:
    """Wait until a signed checkpoint covers the chain's newest entry."""
    deadline = time.monotonic() + WAIT
    with psycopg.connect(stack.admin_database_url) as connection:
        while True:
            head, signed = connection.execute(
                "SELECT (SELECT max(seq) FROM audit.events"
                " WHERE chain_id = %(chain)s),"
                " (SELECT max(seq) FROM audit.checkpoints"
                " WHERE chain_id = %(chain)s)",
                {"chain": org_id},
            ).fetchone()
            if head is not None and head == signed:
                return head
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint at head {head}")
            time.sleep(0.25)
            connection.commit()


def tamper(stack, statement: str, *parameters) -> None:
    """Run a statement as the database superuser, triggers disabled."""
    with psycopg.connect(stack.admin_database_url) as connection:
        connection.execute("SET session_replication_role = replica")
        connection.execute(statement, parameters)


def seq_of(stack, request_id: str) -> int:
    with psycopg.connect(stack.admin_database_url) as connection:
        return connection.execute(
            "SELECT seq FROM audit.events WHERE request_id = %s",
            (request_id,),
        ).fetchone()[0]


def cli_verify(stack, org_id: str) -> tuple[int, dict]:
    completed = cli_process(stack, "audit", "verify", "--org", org_id)

    return completed.returncode, json.loads(completed.stdout or "{}")


def verify_export_offline(stack, export: Path) -> subprocess.CompletedProcess:
    """Run `arxio audit verify-export` with no edge and no credential."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("arxio")),
            "audit",
            "verify-export",
            str(export),
            "--public-key",
            str(stack.run_dir / "audit-signing.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def trail(stack, edge, new_org):
    """An organization with six stored, checkpointed entries."""
    org = new_org()
    request_ids = send_reviews(edge, org, 6)
    stored_rows(stack, request_ids)
    wait_for_checkpoint_at_head(stack, org.org_id)

    return org, request_ids


class TestVerification:
    def test_intact_trail_verifies(self, stack, edge, trail):
        org, _ = trail

        code, report = cli_verify(stack, org.org_id)
        own = edge.request(
            "GET", "/v1/audit:verify", None, {"x-api-key": org.api_key}
        )

        assert 0 == code, report
        assert report["intact"]
        assert int(report["entriesChecked"]) >= 6
        assert 200 == own.status, own.body
        assert own.json()["intact"]

    def test_signed_head_leaves_nothing_unsigned(self, stack, edge, trail):
        """With a checkpoint at the head, verify reports no unsigned
        entries, over the CLI and REST."""
        org, _ = trail

        code, report = cli_verify(stack, org.org_id)
        own = edge.request(
            "GET", "/v1/audit:verify", None, {"x-api-key": org.api_key}
        ).json()

        assert 0 == code, report
        assert "0" == report["unsignedEntries"]
        assert "unsignedSince" not in report
        assert "0" == own["unsignedEntries"]

    def test_altered_row_named(self, stack, trail):
        org, request_ids = trail
        tamper(
            stack,
            "UPDATE audit.events SET status_code = 500 WHERE request_id = %s",
            request_ids[2],
        )

        code, report = cli_verify(stack, org.org_id)

        assert 3 == code
        first = report["problems"][0]
        assert "altered" == first["kind"]
        assert seq_of(stack, request_ids[2]) == int(first["seq"])

    def test_deleted_row_named(self, stack, trail):
        org, request_ids = trail
        deleted_seq = seq_of(stack, request_ids[3])
        tamper(
            stack,
            "DELETE FROM audit.events WHERE request_id = %s",
            request_ids[3],
        )

        code, report = cli_verify(stack, org.org_id)

        assert 3 == code
        first = report["problems"][0]
        assert "deleted" == first["kind"]
        assert deleted_seq == int(first["seq"])

    def test_deleted_newest_caught_by_checkpoint(self, stack, trail):
        org, request_ids = trail
        first_removed = seq_of(stack, request_ids[4])
        tamper(
            stack,
            "DELETE FROM audit.events WHERE request_id = ANY(%s)",
            request_ids[4:],
        )

        code, report = cli_verify(stack, org.org_id)

        assert 3 == code
        first = report["problems"][0]
        assert "deleted" == first["kind"]
        assert first_removed == int(first["seq"])
        assert "checkpoint" in first["message"]

    def test_inserted_row_named(self, stack, trail):
        """A copy of an entry under a new request id repeats its seq.

        The copy is filed a microsecond later: the table rejects a second
        row with the same chain, seq and record time.
        """
        org, request_ids = trail
        tamper(
            stack,
            "INSERT INTO audit.events SELECT gen_random_uuid(), time,"
            " chain_id, seq, org_id, key_id, action, resource_type, method,"
            " endpoint, status_code, grpc_status, response_time_ms,"
            " request_id || '-copy', client_address, prev_hash, hash,"
            " ingest_time, record_time + interval '1 microsecond'"
            " FROM audit.events WHERE request_id = %s",
            request_ids[1],
        )

        code, report = cli_verify(stack, org.org_id)

        assert 3 == code
        assert "inserted" in {p["kind"] for p in report["problems"]}


def stored_entry(
    stack, request_id: str
) -> tuple[chain.Entry, datetime.datetime]:
    """Read an entry as stored, with its record_time."""
    with psycopg.connect(stack.admin_database_url) as connection:
        row = connection.execute(
            "SELECT event_id, time, chain_id, seq, org_id::text, key_id,"
            " action, resource_type, method, endpoint, status_code,"
            " grpc_status, response_time_ms, request_id, client_address,"
            " prev_hash, hash, record_time FROM audit.events"
            " WHERE request_id = %s",
            (request_id,),
        ).fetchone()

    entry = chain.Entry(
        *row[:15], prev_hash=bytes(row[15]), hash=bytes(row[16])
    )

    return entry, row[17]


LOWEST_ID = uuid.UUID("00000000-0000-4000-8000-000000000000")
HIGHEST_ID = uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff")


class TestRepeatedSeq:
    """A second row at an entry's seq, inserted by the superuser with the
    triggers disabled, is named and the genuine entry is not, whichever
    of the two the chain's order by time and event id reads first."""

    @pytest.mark.parametrize(
        ("position", "time_offset_ms", "event_id"),
        [
            (2, -1, LOWEST_ID),
            (2, 1, HIGHEST_ID),
            (2, 0, LOWEST_ID),
            (2, 0, HIGHEST_ID),
            (5, -1, LOWEST_ID),
            (5, 0, HIGHEST_ID),
        ],
    )
    def test_forged_row_named(
        self, stack, edge, trail, position, time_offset_ms, event_id
    ):
        """The forged row links to the same previous entry, and its hash
        recomputes. Only the next entry links to the genuine one, or at the
        head the checkpoint does."""
        org, request_ids = trail
        genuine, record_time = stored_entry(stack, request_ids[position])
        offset = datetime.timedelta(milliseconds=time_offset_ms)
        fields = dataclasses.asdict(genuine)
        del fields["hash"]
        fields |= {
            "event_id": event_id,
            "time": genuine.time + offset,
            "status_code": 500,
            "request_id": f"{genuine.request_id}-forged",
        }
        forged = chain.link_entry(**fields)
        tamper(
            stack,
            "INSERT INTO audit.events (event_id, time, chain_id, seq,"
            " org_id, key_id, action, resource_type, method, endpoint,"
            " status_code, grpc_status, response_time_ms, request_id,"
            " client_address, prev_hash, hash, record_time) VALUES (%s, %s,"
            " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s)",
            *[getattr(forged, name) for name in forged.hashed_fields()],
            forged.hash,
            # Another record_time: the unique index includes it.
            record_time + (offset or datetime.timedelta(microseconds=1)),
        )

        code, report = cli_verify(stack, org.org_id)
        own = edge.request(
            "GET", "/v1/audit:verify", None, {"x-api-key": org.api_key}
        ).json()

        expected = [("inserted", genuine.seq, str(event_id))]
        assert 3 == code, report
        assert expected == [
            (p["kind"], int(p["seq"]), p["eventId"])
            for p in report["problems"]
        ]
        assert expected == [
            (p["kind"], int(p["seq"]), p["eventId"]) for p in own["problems"]
        ]


class TestExport:
    def test_export_verifies_offline(self, stack, edge, trail, tmp_path):
        org, _ = trail
        response = edge.request(
            "GET", "/v1/audit:export", None, {"x-api-key": org.api_key}
        )
        assert 200 == response.status, response.body
        assert response.headers["content-type"].startswith(
            "application/x-ndjson"
        )
        export = tmp_path / "trail.ndjson"
        export.write_bytes(response.body)

        completed = verify_export_offline(stack, export)

        assert 0 == completed.returncode, completed.stderr
        report = json.loads(completed.stdout)
        assert report["intact"]
        assert report["checkpointsChecked"] >= 1

    def test_edited_export_fails(self, stack, edge, trail, tmp_path):
        org, _ = trail
        body = edge.request(
            "GET", "/v1/audit:export", None, {"x-api-key": org.api_key}
        ).body.decode()
        lines = body.splitlines()
        entry = json.loads(lines[2])
        entry["status_code"] = 201
        lines[2] = json.dumps(entry)
        export = tmp_path / "trail.ndjson"
        export.write_text("\n".join(lines) + "\n")

        completed = verify_export_offline(stack, export)

        assert 3 == completed.returncode
        assert "altered" == json.loads(completed.stdout)["problems"][0]["kind"]

    def test_export_reports_unsigned_tail(
        self, stack, edge, new_org, tmp_path
    ):
        """Without its newer checkpoints, an export verifies but reports
        the entries after the oldest one as unsigned, since when."""
        org = new_org()
        for _ in range(2):
            stored_rows(stack, send_reviews(edge, org, 3))
            wait_for_checkpoint_at_head(stack, org.org_id)
        body = edge.request(
            "GET", "/v1/audit:export", None, {"x-api-key": org.api_key}
        ).body.decode()
        records = [json.loads(line) for line in body.splitlines()]
        checkpoints = [r for r in records if r["type"] == "checkpoint"]
        oldest = min(point["seq"] for point in checkpoints)
        entries = [r for r in records if r["type"] == "entry"]
        unsigned = [entry for entry in entries if entry["seq"] > oldest]
        trimmed = [
            record
            for record in records
            if record["type"] != "checkpoint" or record["seq"] == oldest
        ]
        export = tmp_path / "trail.ndjson"
        export.write_text("".join(json.dumps(r) + "\n" for r in trimmed))

        completed = verify_export_offline(stack, export)

        assert 0 == completed.returncode, completed.stdout
        report = json.loads(completed.stdout)
        assert oldest <= 3
        assert len(unsigned) == report["unsignedEntries"]
        since = min(entry["time"] for entry in unsigned)
        assert since == report["unsignedSince"]


class TestQueries:
    def test_get_one_event(self, edge, trail):
        org, _ = trail
        key = {"x-api-key": org.api_key}
        [newest] = edge.request(
            "GET", "/v1/audit?pageSize=1", None, key
        ).json()["auditEvents"]

        response = edge.request(
            "GET", f"/v1/audit/{newest['eventId']}", None, key
        )

        assert 200 == response.status, response.body
        assert newest == response.json()

    def test_other_orgs_event_is_404(self, edge, trail, new_org):
        org, _ = trail
        [event] = edge.request(
            "GET", "/v1/audit?pageSize=1", None, {"x-api-key": org.api_key}
        ).json()["auditEvents"]
        other = new_org()

        response = edge.request(
            "GET",
            f"/v1/audit/{event['eventId']}",
            None,
            {"x-api-key": other.api_key},
        )

        assert 404 == response.status

    def test_filters(self, edge, trail):
        org, request_ids = trail
        key = {"x-api-key": org.api_key}
        bad = edge.request("POST", REVIEW_PATH, {"question": "x" * 2001}, key)
        assert 400 == bad.status

        def events(query: str) -> list[dict]:
            deadline = time.monotonic() + WAIT
            while True:
                found = edge.request(
                    "GET", f"/v1/audit?{query}", None, key
                ).json()["auditEvents"]
                if found or time.monotonic() > deadline:
                    return found
                time.sleep(0.25)

        rejected = events("statusCode=400")
        assert [bad.headers["x-request-id"]] == [
            event["requestId"] for event in rejected
        ]
        by_key = events(f"keyId={org.key_id}&action=cds.clinical_review")
        assert {org.key_id} == {event["keyId"] for event in by_key}
        start = rejected[0]["time"]
        after = events(f"startTime={start}")
        assert all(event["time"] >= start for event in after)

    @pytest.mark.parametrize(
        ("query", "field"),
        [
            ("pageSize=1001", "pageSize"),
            ("statusCode=42", "statusCode"),
            (
                "startTime=2026-12-02T00:00:00Z&endTime=2026-12-01T00:00:00Z",
                "endTime",
            ),
        ],
    )
    def test_invalid_filters_rejected(self, edge, new_org, query, field):
        org = new_org()

        response = edge.request(
            "GET", f"/v1/audit?{query}", None, {"x-api-key": org.api_key}
        )

        assert 400 == response.status
        assert field in response.body.decode()


class TestReadOrder:
    def test_checkpoint_signed_while_entries_read(self, stack, edge, trail):
        """A checkpoint signed after verify read the entries covers an
        entry that the read missed. Verify reads the checkpoints first, so
        that entry is not reported deleted."""
        org, _ = trail
        key = chain.load_private_key(
            (stack.run_dir / "audit-signing.key").read_bytes()
        )
        keys = {chain.public_key_id(key.public_key()): key.public_key()}

        class SignedAfterRead(AuditStore):
            """The store, with a new entry stored and signed right after
            the entries were read."""

            def __init__(self, sessions, checkpointer):
                super().__init__(sessions)
                self._checkpointer = checkpointer

            async def chain_entries(self, chain_id, *args):
                async for entry in super().chain_entries(chain_id, *args):
                    yield entry
                stored_rows(stack, send_reviews(edge, org, 1))
                await self._checkpointer.run_once()

        async def verify() -> chain.Verification:
            engine = db.create_engine(
                db.with_user(stack.admin_database_url, service_role("audit")),
                pool_size=2,
            )
            try:
                sessions = db.session_factory(engine)
                checkpointer = Checkpointer(AuditStore(sessions), key, keys)
                store = SignedAfterRead(sessions, checkpointer)

                return await verify_stored_chain(
                    store, uuid.UUID(org.org_id), keys
                )
            finally:
                await engine.dispose()

        result = asyncio.run(verify())
        newest = wait_for_checkpoint_at_head(stack, org.org_id)

        assert result.intact, result.problems
        assert newest == result.last_seq + 1
