"""A chain that no checkpoint covers yet, which is the normal state until
the audit service's first checkpoint run after its first entry, verifies
as intact with every entry unsigned: over the CLI, REST and an export."""

import datetime
import json

import psycopg
import pytest

from tests.e2e.test_audit import stored_rows
from tests.e2e.test_audit_chain import (
    cli_verify,
    send_reviews,
    seq_of,
    tamper,
    verify_export_offline,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def unsigned_stack():
    """A suite whose checkpointer runs at start and then once an hour, so
    the organizations that the tests create get no checkpoint."""
    with own_stack(checkpoint_seconds=3600.0) as running:
        yield running


@pytest.fixture
def unsigned_trail(unsigned_stack):
    """An organization with three stored entries and no checkpoint."""
    stack = unsigned_stack
    edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
    org = Organization(stack)
    request_ids = send_reviews(edge, org, 3)
    stored_rows(stack, request_ids)
    with psycopg.connect(stack.admin_database_url) as connection:
        signed = connection.execute(
            "SELECT count(*) FROM audit.checkpoints WHERE chain_id = %s",
            (org.org_id,),
        ).fetchone()[0]
    assert 0 == signed

    return stack, edge, org, request_ids


def oldest_time(stack, request_ids: list[str]) -> datetime.datetime:
    with psycopg.connect(stack.admin_database_url) as connection:
        return connection.execute(
            "SELECT min(time) FROM audit.events WHERE request_id = ANY(%s)",
            (request_ids,),
        ).fetchone()[0]


def unsigned_since(report: dict) -> datetime.datetime:
    """Return a report's unsignedSince, which may have 3, 6 or 9 digits
    of fractional seconds."""
    return datetime.datetime.fromisoformat(report["unsignedSince"])


def test_new_chain_verifies_unsigned(unsigned_trail, tmp_path):
    stack, edge, org, request_ids = unsigned_trail
    since = oldest_time(stack, request_ids)

    code, report = cli_verify(stack, org.org_id)
    own = edge.request(
        "GET", "/v1/audit:verify", None, {"x-api-key": org.api_key}
    )
    export = edge.request(
        "GET", "/v1/audit:export", None, {"x-api-key": org.api_key}
    )
    (tmp_path / "trail.ndjson").write_bytes(export.body)
    offline = verify_export_offline(stack, tmp_path / "trail.ndjson")

    assert 0 == code, report
    assert report["intact"]
    assert [] == report["problems"]
    assert "3" == report["unsignedEntries"]
    assert since == unsigned_since(report)
    assert 200 == own.status, own.body
    assert own.json()["intact"]
    assert "3" == own.json()["unsignedEntries"]
    assert since == unsigned_since(own.json())
    assert 0 == offline.returncode, offline.stdout + offline.stderr
    exported = json.loads(offline.stdout)
    assert exported["intact"]
    # The export may also contain the entry of the verify request.
    assert exported["entriesChecked"] == exported["unsignedEntries"]
    assert since == unsigned_since(exported)


def test_altered_unsigned_entry_named(unsigned_trail):
    """Without a checkpoint, a changed entry still breaks its hash."""
    stack, _, org, request_ids = unsigned_trail
    tamper(
        stack,
        "UPDATE audit.events SET status_code = 500 WHERE request_id = %s",
        request_ids[1],
    )

    code, report = cli_verify(stack, org.org_id)

    assert 3 == code, report
    [problem] = report["problems"]
    assert "altered" == problem["kind"]
    assert seq_of(stack, request_ids[1]) == int(problem["seq"])
