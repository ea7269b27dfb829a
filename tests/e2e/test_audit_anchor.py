"""The audit service never signs a chain that a database superuser rewrote
after deleting its checkpoints, even after a restart, and it goes on
signing the other chains.

The rewrite is the one a superuser can make: delete the chain's
checkpoints, delete one entry, renumber and rehash the later entries and
move the chain's head to match. With no checkpoint left, the chain alone
verifies as intact, so only the anchor file outside the database shows
that it was signed further before. Verification compares the chain with
that file too, and a second audit process whose anchor file is empty
signs nothing until it is started once with ARXIO_AUDIT_ANCHOR_ADOPT.
"""

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from services.audit import chain
from services.launcher.processes import ChildProcess, free_port
from services.launcher.stack import AUDIT_ANCHOR_FILE
from tests.e2e.fault_load import sample_sum, scrape
from tests.e2e.test_audit import stored_rows
from tests.e2e.test_audit_chain import (
    cli_verify,
    send_reviews,
    wait_for_checkpoint_at_head,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

CHECKPOINT_SECONDS = 1.0
# Checkpoint runs to wait for before concluding that a chain stays unsigned.
RUNS = 4
# Seconds to wait for a second audit process's log events.
WAIT = 60.0
REJECTIONS = "arxio_audit_checkpoint_rejections_total"
_COLUMNS = (
    "event_id, time, chain_id, seq, org_id, key_id, action, resource_type,"
    " method, endpoint, status_code, grpc_status, response_time_ms,"
    " request_id, client_address, prev_hash, hash"
)


@pytest.fixture(scope="module")
def anchor_stack():
    with own_stack(checkpoint_seconds=CHECKPOINT_SECONDS) as stack:
        yield stack


@pytest.fixture(scope="module")
def edge(anchor_stack) -> EdgeClient:
    return EdgeClient(
        anchor_stack.edge_port, anchor_stack.certs_dir / "ca.crt"
    )


def signed_trail(stack, edge, count: int) -> Organization:
    """Create an organization with `count` stored, checkpointed entries."""
    org = Organization(stack)
    stored_rows(stack, send_reviews(edge, org, count))
    wait_for_checkpoint_at_head(stack, org.org_id)

    return org


def rewrite_without(stack, chain_id: str, drop_seq: int) -> int:
    """Delete entry `drop_seq` and the chain's checkpoints, then relink the
    later entries and the head, as a superuser would. Return the new head's
    seq."""
    with psycopg.connect(stack.admin_database_url) as connection:
        connection.execute("SET session_replication_role = replica")
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM audit.events WHERE chain_id = %s"
            " ORDER BY seq",
            (chain_id,),
        ).fetchall()
        entries = [
            chain.Entry(*row[:4], str(row[4]), *row[5:]) for row in rows
        ]
        connection.execute(
            "DELETE FROM audit.checkpoints WHERE chain_id = %s", (chain_id,)
        )
        connection.execute(
            "DELETE FROM audit.events WHERE chain_id = %s AND seq >= %s",
            (chain_id, drop_seq),
        )
        prev_hash = entries[drop_seq - 2].hash
        seq = drop_seq
        for entry in entries[drop_seq:]:
            fields = dataclasses.asdict(entry)
            fields.pop("hash")
            fields.update(seq=seq, prev_hash=prev_hash)
            linked = chain.link_entry(**fields)
            values = dataclasses.astuple(linked)
            connection.execute(
                f"INSERT INTO audit.events ({_COLUMNS}, record_time)"
                f" VALUES ({', '.join(['%s'] * len(values))}, %s)",
                (*values, linked.time),
            )
            prev_hash, seq = linked.hash, seq + 1
        connection.execute(
            "UPDATE audit.head_entries SET seq = %s, hash = %s"
            " WHERE chain_id = %s",
            (seq - 1, prev_hash, chain_id),
        )

    return seq - 1


def checkpoint_count(stack, chain_id: str) -> int:
    with psycopg.connect(stack.admin_database_url) as connection:
        return connection.execute(
            "SELECT count(*) FROM audit.checkpoints WHERE chain_id = %s",
            (chain_id,),
        ).fetchone()[0]


def events_logged(log: Path, name: str) -> list[dict]:
    """Return the JSON log events called `name` in the file `log`."""
    if not log.exists():
        return []
    events = []
    for line in log.read_text().splitlines():
        if name not in line:
            continue
        event = json.loads(line)
        if event.get("event") == name:
            events.append(event)

    return events


def rejections_logged(stack, chain_id: str) -> list[dict]:
    return [
        event
        for event in events_logged(
            stack.run_dir / "logs" / "audit.log", "audit.checkpoint_rejected"
        )
        if event.get("chain_id") == chain_id
    ]


def wait_for_events(log: Path, name: str, count: int) -> list[dict]:
    """Wait until `log` contains `count` events called `name`."""
    deadline = time.monotonic() + WAIT
    while len(events := events_logged(log, name)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(events)} of {count} {name} events")
        time.sleep(0.25)

    return events


@contextlib.contextmanager
def second_audit(
    stack, anchor_file: Path, adopt: bool = False
) -> Iterator[tuple[ChildProcess, int]]:
    """Run a second audit process on the stack's database with its own
    anchor file, as a second replica runs; yield it and its metrics port.

    Envoy does not route to it, so only its checkpointer matters.
    """
    metrics_port = free_port()
    environment = stack.child("audit").environment | {
        "ARXIO_PORT": str(free_port()),
        "ARXIO_METRICS_PORT": str(metrics_port),
        "ARXIO_AUDIT_ANCHOR_FILE": str(anchor_file),
    }
    environment.pop("ARXIO_HEALTH_PORT", None)
    if adopt:
        environment["ARXIO_AUDIT_ANCHOR_ADOPT"] = "true"
    replica = ChildProcess(
        "audit-replica",
        [sys.executable, "-m", "services.audit"],
        environment,
        anchor_file.with_suffix(".log"),
    )
    replica.start()
    try:
        yield replica, metrics_port
    finally:
        replica.stop()


def anchored_seqs_in(anchor_file: Path, chain_id: str) -> list[int]:
    lines = anchor_file.read_text().splitlines()

    return [
        json.loads(line)["seq"]
        for line in lines
        if json.loads(line)["chain_id"] == chain_id
    ]


def anchored_seqs(stack, chain_id: str) -> list[int]:
    return anchored_seqs_in(stack.run_dir / AUDIT_ANCHOR_FILE, chain_id)


def test_rewritten_chain_never_signed(anchor_stack, edge):
    stack = anchor_stack
    rewritten = signed_trail(stack, edge, 6)
    other = signed_trail(stack, edge, 3)
    assert [6] == anchored_seqs(stack, rewritten.org_id)[-1:]

    head = rewrite_without(stack, rewritten.org_id, 3)
    assert 5 == head
    # Each chain gets a new entry, so both have something to sign.
    stored_rows(stack, send_reviews(edge, rewritten, 1))
    stored_rows(stack, send_reviews(edge, other, 1))
    wait_for_checkpoint_at_head(stack, other.org_id)
    time.sleep(RUNS * CHECKPOINT_SECONDS)

    assert 0 == checkpoint_count(stack, rewritten.org_id)
    [event] = rejections_logged(stack, rewritten.org_id)
    assert "error" == event["level"]
    assert "checkpoint_missing" == event["reason"]
    assert 6 == event["expected_seq"]
    assert 0 == event["found_seq"]
    # Ids and numbers only: no entry's fields or hashes.
    assert set() == event.keys() & {"hash", "request_id", "key_id"}
    samples = scrape(stack.metrics_ports["audit"])
    assert sample_sum(samples, REJECTIONS, reason="checkpoint_missing") >= RUNS

    # A restarted service reads the anchor file back and still rejects it.
    stack.restart_child("audit")
    stored_rows(stack, send_reviews(edge, other, 1))
    wait_for_checkpoint_at_head(stack, other.org_id)
    time.sleep(RUNS * CHECKPOINT_SECONDS)

    assert 0 == checkpoint_count(stack, rewritten.org_id)
    assert 2 == len(rejections_logged(stack, rewritten.org_id))
    samples = scrape(stack.metrics_ports["audit"])
    assert sample_sum(samples, REJECTIONS, reason="checkpoint_missing") >= RUNS
    assert [6] == anchored_seqs(stack, rewritten.org_id)[-1:]
    assert [5] == anchored_seqs(stack, other.org_id)[-1:]


def test_empty_anchor_file_signs_nothing(anchor_stack, edge, tmp_path):
    """A second audit process whose anchor file is empty, while the
    database contains checkpoints, signs no chain. The rewritten one is
    included, and the process logs and counts why on every run."""
    stack = anchor_stack
    rewritten = signed_trail(stack, edge, 6)
    rewrite_without(stack, rewritten.org_id, 3)
    stored_rows(stack, send_reviews(edge, rewritten, 1))
    anchor_file = tmp_path / "replica-anchors.ndjson"

    with second_audit(stack, anchor_file) as (replica, metrics_port):
        events = wait_for_events(
            replica.log_file, "audit.anchor_file_empty", RUNS
        )
        samples = scrape(metrics_port)

    assert 0 == checkpoint_count(stack, rewritten.org_id)
    assert [] == events_logged(replica.log_file, "audit.checkpoint_signed")
    assert "" == anchor_file.read_text()
    first = events[0]
    assert "error" == first["level"]
    assert str(anchor_file) == first["path"]
    assert first["chains_checkpointed"] >= 1
    assert "ARXIO_AUDIT_ANCHOR_ADOPT=true" in first["action"]
    assert "copy another replica's anchor file" in first["action"]
    # Ids and numbers only: no entry's fields or hashes.
    assert set() == first.keys() & {"hash", "request_id", "key_id"}
    assert sample_sum(samples, REJECTIONS, reason="anchor_file_empty") >= RUNS


def test_adopt_signs_database_chains(anchor_stack, edge, tmp_path):
    """With ARXIO_AUDIT_ANCHOR_ADOPT=true an audit process whose anchor
    file is empty trusts the database's checkpoints, logs how many chains
    it adopted, and signs the chain as the database has it."""
    stack = anchor_stack
    rewritten = signed_trail(stack, edge, 6)
    other = signed_trail(stack, edge, 2)
    rewrite_without(stack, rewritten.org_id, 3)
    anchor_file = tmp_path / "replica-anchors.ndjson"

    with second_audit(stack, anchor_file, adopt=True) as (replica, _):
        [adopted] = wait_for_events(
            replica.log_file, "audit.anchors_adopted", 1
        )
        stored_rows(stack, send_reviews(edge, rewritten, 1))
        head = wait_for_checkpoint_at_head(stack, rewritten.org_id)
        wait_for_events(replica.log_file, "audit.checkpoint_signed", 1)

    assert "warning" == adopted["level"]
    assert adopted["chains"] >= 1
    assert [] == events_logged(replica.log_file, "audit.anchor_file_empty")
    assert 6 == head
    assert [6] == anchored_seqs_in(anchor_file, rewritten.org_id)[-1:]
    assert [2] == anchored_seqs_in(anchor_file, other.org_id)[-1:]


def test_verify_reports_deleted_checkpoints(anchor_stack, edge):
    """After the rewrite the chain alone is consistent, but verify over the
    CLI and REST compares it with the anchor and reports it not intact."""
    stack = anchor_stack
    org = signed_trail(stack, edge, 6)
    rewrite_without(stack, org.org_id, 3)

    code, report = cli_verify(stack, org.org_id)
    own = edge.request(
        "GET", "/v1/audit:verify", None, {"x-api-key": org.api_key}
    )

    assert 3 == code
    assert not report["intact"]
    [problem] = report["problems"]
    assert "deleted" == problem["kind"]
    assert 6 == int(problem["seq"])
    assert "seq 6" in problem["message"]
    assert "no valid checkpoint of this chain" in problem["message"]
    assert 200 == own.status, own.body
    assert not own.json()["intact"]
    [problem] = own.json()["problems"]
    assert "deleted" == problem["kind"]
    assert 6 == int(problem["seq"])


def test_all_checkpoints_deleted_signs_nothing(anchor_stack, edge, tmp_path):
    """With every checkpoint deleted the database looks new, but entries
    stored two checkpoint intervals before an audit process started show
    that checkpoints existed: with an empty anchor file it signs nothing.

    Last in the module, because it deletes every chain's checkpoints.
    """
    stack = anchor_stack
    rewritten = signed_trail(stack, edge, 6)
    rewrite_without(stack, rewritten.org_id, 3)
    with psycopg.connect(stack.admin_database_url) as connection:
        connection.execute("SET session_replication_role = replica")
        connection.execute("DELETE FROM audit.checkpoints")
    time.sleep(2 * CHECKPOINT_SECONDS)
    anchor_file = tmp_path / "replica-anchors.ndjson"

    with second_audit(stack, anchor_file) as (replica, _):
        [empty] = wait_for_events(
            replica.log_file, "audit.anchor_file_empty", 1
        )

    assert 0 == checkpoint_count(stack, rewritten.org_id)
    assert [] == events_logged(replica.log_file, "audit.checkpoint_signed")
    assert "" == anchor_file.read_text()
    assert 0 == empty["chains_checkpointed"]
