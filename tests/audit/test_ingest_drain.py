"""How the audit ingester stops, storing the file to its end after
SIGTERM, and what it logs when PostgreSQL rejects a batch.

Each test runs `python -m services.audit.ingest` as the pod runs it, against
an embedded PostgreSQL, and stops it with SIGTERM as the kubelet does.
"""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from services.common import db
from services.common.migrations import service_role
from services.launcher.processes import base_environment
from services.launcher.stack import REPO_ROOT
from tests.suite import migrated_database

# More lines than one batch contains (2000), so SIGTERM arrives mid-backlog.
BACKLOG_LINES = 20000
# Lines that Envoy's last flush adds after the ingester got SIGTERM.
LATE_LINES = 50
STOP_TIMEOUT = 120.0


def access_lines(count: int, status: str = "401") -> bytes:
    lines = []
    for _ in range(count):
        request_id = str(uuid.uuid4())
        line = {
            "time": "2026-12-04T09:00:00.000001Z",
            "request_id": request_id,
            "reply_request_id": request_id,
            "method": "GET",
            "route": "-",
            "status": status,
        }
        lines.append(json.dumps(line).encode() + b"\n")

    return b"".join(lines)


@pytest.fixture(scope="module")
def database():
    """Yield the audit role's URL and the admin URL of a fresh database."""
    with migrated_database("ingest-") as admin_url:
        yield db.with_user(admin_url, service_role("audit")), admin_url


def start_ingester(
    database_url: str, log_file: Path, output: Path, **settings: str
) -> subprocess.Popen:
    environment = base_environment() | {
        "DATABASE_URL": database_url,
        "ARXIO_AUDIT_LOG_FILE": str(log_file),
        "ARXIO_AUDIT_SOURCE": f"test-{uuid.uuid4()}",
    }

    return subprocess.Popen(
        [sys.executable, "-m", "services.audit.ingest"],
        env=environment | settings,
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )


def events(output: Path) -> list[dict]:
    entries = []
    for line in output.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue

    return entries


def wait_for_event(
    process: subprocess.Popen, output: Path, name: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(entry.get("event") == name for entry in events(output)):
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(
        f"the ingester did not log {name!r}: {output.read_text()[-3000:]}"
    )


def stored_count(admin_url: str, source_file: Path) -> int:
    """Return the rows stored so far, counted by the lines' request ids."""
    request_ids = [
        json.loads(line)["request_id"]
        for line in source_file.read_text().splitlines()
    ]
    with psycopg.connect(admin_url) as connection:
        row = connection.execute(
            "SELECT count(*) FROM audit.events"
            " WHERE request_id = ANY(%s::text[])",
            (request_ids,),
        ).fetchone()

    return row[0]


class TestDrain:
    def test_sigterm_stores_whole_backlog(self, database, tmp_path):
        database_url, admin_url = database
        log_file = tmp_path / "access.log"
        log_file.write_bytes(access_lines(BACKLOG_LINES))
        output = tmp_path / "ingester.log"
        process = start_ingester(database_url, log_file, output)
        try:
            wait_for_event(process, output, "audit.batch_stored", 60)
            process.send_signal(signal.SIGTERM)
            # Envoy's last flush, after the ingester's stop request.
            with log_file.open("ab") as handle:
                handle.write(access_lines(LATE_LINES))
            code = process.wait(STOP_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()

        assert 0 == code, output.read_text()[-3000:]
        assert BACKLOG_LINES + LATE_LINES == stored_count(admin_url, log_file)
        logged = [entry["event"] for entry in events(output)]
        assert "audit.drained" in logged

    def test_drain_bounded_while_database_down(self, tmp_path):
        log_file = tmp_path / "access.log"
        log_file.write_bytes(access_lines(10))
        output = tmp_path / "ingester.log"
        # A socket folder that does not exist: every connection fails.
        unreachable = (
            f"postgresql://arxio_audit@/arxio?host={tmp_path / 'no-server'}"
        )
        process = start_ingester(
            unreachable, log_file, output, ARXIO_AUDIT_DRAIN_SECONDS="2"
        )
        try:
            wait_for_event(process, output, "audit.store_failed", 60)
            stop_requested = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(STOP_TIMEOUT)
            stop_seconds = time.monotonic() - stop_requested
        finally:
            if process.poll() is None:
                process.kill()

        assert 0 == code, output.read_text()[-3000:]
        assert stop_seconds >= 2
        assert stop_seconds < 15
        [timed_out] = [
            entry
            for entry in events(output)
            if entry.get("event") == "audit.drain_timed_out"
        ]
        assert timed_out["bytes_behind"] > 0


class TestStoreFailure:
    def test_rejected_batch_logged_with_constraint(self, database, tmp_path):
        database_url, admin_url = database
        log_file = tmp_path / "access.log"
        # Only this test's lines carry 418, so the constraint below
        # rejects no other test's rows.
        log_file.write_bytes(access_lines(5, status="418"))
        output = tmp_path / "ingester.log"
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(
                "ALTER TABLE audit.events ADD CONSTRAINT reject_418"
                " CHECK (status_code <> 418)"
            )
        process = start_ingester(database_url, log_file, output)
        try:
            wait_for_event(process, output, "audit.store_failed", 60)
        finally:
            process.kill()
            process.wait(STOP_TIMEOUT)
            with psycopg.connect(admin_url, autocommit=True) as connection:
                connection.execute(
                    "ALTER TABLE audit.events DROP CONSTRAINT reject_418"
                )

        [failed, *_] = [
            entry
            for entry in events(output)
            if entry.get("event") == "audit.store_failed"
        ]
        assert "IntegrityError" == failed["error"]
        # check_violation
        assert "23514" == failed["sqlstate"]
        assert "reject_418" == failed["constraint"]
        # PostgreSQL's detail, which quotes the row, stays out.
        assert "Failing row" not in output.read_text()
