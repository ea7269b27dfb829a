"""The audit ingester rotates the access-log file without losing or
repeating an entry: a real Envoy writes the file, a real ingester reads
it, and the ingester stops at each step of a rotation and starts again."""

import random
import threading
import time
import urllib.request

import psycopg
import pytest

from services.audit.ingest import file_id
from services.audit.log_rotation import rotated_path
from tests.edge import EdgeClient
from tests.suite import own_stack

pytestmark = pytest.mark.e2e

# About ten access-log lines, so a few requests rotate the file.
MAX_BYTES = 4096
REVIEW_PATH = "/v1/cds/clinical-review"
WAIT = 60.0


@pytest.fixture(scope="module")
def rotating_stack():
    environment = {"ARXIO_AUDIT_LOG_MAX_BYTES": str(MAX_BYTES)}
    with own_stack(service_environment={"audit-ingest": environment}) as stack:
        yield stack


@pytest.fixture
def edge(rotating_stack) -> EdgeClient:
    return EdgeClient(
        rotating_stack.edge_port, rotating_stack.certs_dir / "ca.crt"
    )


def send(edge: EdgeClient, count: int) -> list[str]:
    """Send requests without a key (401, audited); return their ids."""
    return [
        edge.request("POST", REVIEW_PATH, {}).headers["x-request-id"]
        for _ in range(count)
    ]


def entry_counts(stack, request_ids: list[str]) -> dict[str, int]:
    """Wait until every request id has an entry; return entries per id."""
    deadline = time.monotonic() + WAIT
    with psycopg.connect(stack.admin_database_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT request_id, count(*) FROM audit.events"
                " WHERE request_id = ANY(%s) GROUP BY request_id",
                (request_ids,),
            ).fetchall()
            counts = dict(rows)
            if len(counts) == len(set(request_ids)):
                return counts
            if time.monotonic() > deadline:
                missing = len(set(request_ids) - set(counts))
                raise AssertionError(f"{missing} requests have no entry")
            time.sleep(0.25)


def wait_for_rotation_end(stack) -> None:
    """Wait until no renamed file is left: its rotation is finished."""
    deadline = time.monotonic() + WAIT
    while rotated_path(stack.access_log_path).exists():
        if time.monotonic() > deadline:
            raise AssertionError("the renamed access log was not deleted")
        time.sleep(0.1)


def reopen_logs(stack) -> None:
    """Make Envoy reopen its access log, as the ingester does."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.ports['envoy_admin']}/reopen_logs",
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert 200 == response.status
    deadline = time.monotonic() + WAIT
    while not stack.access_log_path.exists():
        if time.monotonic() > deadline:
            raise AssertionError("Envoy did not create a new access log")
        time.sleep(0.01)


def ingester_events(stack, event: str) -> int:
    log = stack.run_dir / "logs" / "audit-ingest.log"

    return log.read_text().count(f'"event": "{event}"')


def assert_once_each(stack, request_ids: list[str]) -> None:
    counts = entry_counts(stack, request_ids)

    repeated = {rid: n for rid, n in counts.items() if n != 1}
    assert {} == repeated


def wait_for_rotations(stack, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while ingester_events(stack, "audit.log_rotated") < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} rotations")
        time.sleep(0.1)


def test_rotates_past_max_size(rotating_stack, edge):
    """The file is renamed, read to its end and deleted each time it
    passes the limit, and every request keeps exactly one entry."""
    stack = rotating_stack
    request_ids = []

    # Each round writes more than MAX_BYTES, so each ends in a rotation.
    for _ in range(5):
        rotations = ingester_events(stack, "audit.log_rotated")
        request_ids += send(edge, 20)
        entry_counts(stack, request_ids)
        wait_for_rotations(stack, rotations + 1)

    assert_once_each(stack, request_ids)
    wait_for_rotation_end(stack)
    assert stack.access_log_path.stat().st_size < MAX_BYTES


def test_restart_after_rename(rotating_stack, edge):
    """An ingester stopped right after renaming the file requests that
    Envoy reopen its log when it starts again, and finishes the rotation."""
    stack = rotating_stack
    wait_for_rotation_end(stack)
    ingester = stack.child("audit-ingest")
    ingester.stop()
    stack.access_log_path.rename(rotated_path(stack.access_log_path))
    # Envoy still writes to the renamed file: it was not asked to reopen.
    written_before_start = send(edge, 20)

    ingester.start()
    written_after_start = send(edge, 20)

    assert_once_each(stack, written_before_start + written_after_start)
    wait_for_rotation_end(stack)


def test_restart_after_reopen(rotating_stack, edge):
    """An ingester stopped after Envoy reopened its log reads the renamed
    file on from its committed offset, then the new file from its start."""
    stack = rotating_stack
    wait_for_rotation_end(stack)
    ingester = stack.child("audit-ingest")
    ingester.stop()
    unread = send(edge, 15)
    # Lines reach the file within Envoy's 200 ms flush interval.
    time.sleep(1.0)
    stack.access_log_path.rename(rotated_path(stack.access_log_path))
    reopen_logs(stack)
    in_new_file = send(edge, 15)

    ingester.start()

    assert_once_each(stack, unread + in_new_file)
    wait_for_rotation_end(stack)


def test_restart_after_switch(rotating_stack, edge):
    """An ingester stopped after committing the switch to the new file
    deletes the renamed file without storing its lines again."""
    stack = rotating_stack
    wait_for_rotation_end(stack)
    stored = send(edge, 15)
    assert_once_each(stack, stored)
    time.sleep(1.0)
    ingester = stack.child("audit-ingest")
    ingester.stop()
    renamed = rotated_path(stack.access_log_path)
    stack.access_log_path.rename(renamed)
    reopen_logs(stack)
    with psycopg.connect(stack.admin_database_url) as connection:
        connection.execute(
            "UPDATE audit.ingest_offsets SET file_id = %s, byte_offset = 0",
            (file_id(stack.access_log_path),),
        )
    in_new_file = send(edge, 15)

    ingester.start()

    assert_once_each(stack, stored + in_new_file)
    wait_for_rotation_end(stack)


def test_killed_during_load_loses_nothing(rotating_stack, edge):
    """Killed at whatever step it is in, over and over while requests
    arrive, the ingester still stores each request exactly once."""
    stack = rotating_stack
    wait_for_rotation_end(stack)
    sent: list[str] = []
    stopping = threading.Event()

    def send_until_stopped() -> None:
        while not stopping.is_set():
            sent.extend(send(edge, 5))

    sending = threading.Thread(target=send_until_stopped)
    sending.start()
    # Long enough for a restarted ingester to load and reach its loop,
    # where the file rotates several times a second under this load.
    pauses = random.Random(7)
    try:
        for _ in range(6):
            time.sleep(pauses.uniform(1.5, 3.0))
            stack.restart_child("audit-ingest", kill=True)
    finally:
        stopping.set()
        sending.join()

    assert len(sent) > 100
    assert_once_each(stack, sent)
    wait_for_rotation_end(stack)
