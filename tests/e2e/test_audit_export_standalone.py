"""A real export of GET /v1/audit:export, verified by the standalone
verifier (tools/verify_audit_export.py) and by `arxio audit verify-export`,
which must agree."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_audit import stored_rows
from tests.e2e.test_audit_chain import (
    send_reviews,
    verify_export_offline,
    wait_for_checkpoint_at_head,
)

pytestmark = pytest.mark.e2e

VERIFIER = (
    Path(__file__).resolve().parents[2] / "tools" / "verify_audit_export.py"
)
# The report fields that both verifiers write under the same name.
SHARED_FIELDS = (
    "chainId",
    "intact",
    "entriesChecked",
    "checkpointsChecked",
    "firstSeq",
    "lastSeq",
    "unsignedEntries",
)


def verify_standalone(stack, export: Path) -> subprocess.CompletedProcess:
    """Run a copy of the verifier with `python -I` beside the export."""
    shutil.copy(VERIFIER, export.parent)

    return subprocess.run(
        [
            sys.executable,
            "-I",
            "verify_audit_export.py",
            export.name,
            "--public-key",
            str(stack.run_dir / "audit-signing.pub"),
        ],
        cwd=export.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_real_export_agrees_with_cli(stack, edge, new_org, tmp_path):
    org = new_org()
    stored_rows(stack, send_reviews(edge, org, 4))
    wait_for_checkpoint_at_head(stack, org.org_id)
    response = edge.request(
        "GET", "/v1/audit:export", None, {"x-api-key": org.api_key}
    )
    assert 200 == response.status, response.body
    export = tmp_path / "trail.ndjson"
    export.write_bytes(response.body)
    lines = response.body.decode().splitlines()
    entry = json.loads(lines[2])
    lines[2] = json.dumps({**entry, "status_code": 201})
    edited = tmp_path / "edited.ndjson"
    edited.write_text("\n".join(lines) + "\n")

    standalone = verify_standalone(stack, export)
    cli = verify_export_offline(stack, export)
    standalone_edited = verify_standalone(stack, edited)
    cli_edited = verify_export_offline(stack, edited)

    assert 0 == standalone.returncode, standalone.stdout + standalone.stderr
    assert 0 == cli.returncode, cli.stdout + cli.stderr
    report = json.loads(standalone.stdout)
    expected = json.loads(cli.stdout)
    for name in SHARED_FIELDS:
        assert expected[name] == report[name], name
    assert report["entriesChecked"] >= 4
    assert 3 == standalone_edited.returncode, standalone_edited.stdout
    assert 3 == cli_edited.returncode, cli_edited.stdout
    problem = json.loads(standalone_edited.stdout)["problems"][0]
    expected_problem = json.loads(cli_edited.stdout)["problems"][0]
    assert ("altered", entry["seq"]) == (problem["kind"], problem["seq"])
    assert expected_problem["kind"] == problem["kind"]
    assert expected_problem["seq"] == problem["seq"]
    assert set(expected_problem) == set(problem)
    assert expected_problem["eventId"] == problem["eventId"]
