"""The standalone export verifier, tools/verify_audit_export.py, run as a
separate isolated process on exports built with the product's own chain
code, and compared with chain.verify_export on each one."""

import ast
import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from services.audit import chain
from services.audit.servicers import public_key_lines
from tests.audit.test_chain import (
    CHAIN,
    CUT_ALLOWED,
    KEY,
    KEYS,
    MONTH_END,
    RETENTION_MONTHS,
    checkpoint_at,
    forge,
    make_chain,
)

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = ROOT / "tools" / "verify_audit_export.py"
TRUSTED = (KEY.public_key(),)


def export_lines(
    entries,
    checkpoints,
    last_removed_seq: int = 0,
    export_time: str = chain.utc_text(CUT_ALLOWED),
    **header_changes,
) -> list[str]:
    """Write an export in the form of GET /v1/audit:export, made at
    `export_time`, when a cut at MONTH_END is valid.

    `header_changes` overrides members of the header, and None removes one.
    """
    header = {
        "type": "export",
        "chain_id": str(CHAIN),
        "last_removed_seq": last_removed_seq,
        "retention_months": RETENTION_MONTHS,
        "export_time": export_time,
    }
    header |= header_changes
    header = {
        name: value for name, value in header.items() if value is not None
    }

    return [
        json.dumps(header),
        *(json.dumps({"type": "entry", **e.to_json()}) for e in entries),
        *(
            json.dumps({"type": "checkpoint", **p.to_json()})
            for p in checkpoints
        ),
        *(json.dumps(line) for line in public_key_lines(KEYS)),
    ]


def write_public_key(path: Path, key: Ed25519PublicKey) -> Path:
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )

    return path


def run_verifier(
    tmp_path: Path,
    lines: list[str],
    trusted=TRUSTED,
    arguments=(),
) -> subprocess.CompletedProcess:
    """Run a copy of the verifier with `python -I` from an empty folder,
    where no arxio module is on its path."""
    folder = tmp_path / "auditor"
    folder.mkdir(exist_ok=True)
    shutil.copy(VERIFIER, folder)
    (folder / "trail.ndjson").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-I", "verify_audit_export.py", "trail.ndjson"]
    for number, key in enumerate(trusted):
        write_public_key(folder / f"trusted-{number}.pub", key)
        command += ["--public-key", f"trusted-{number}.pub"]

    return subprocess.run(
        [*command, *arguments],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


def summary_of_report(report: dict) -> dict:
    return {
        "intact": report["intact"],
        "problems": [
            (problem["kind"], problem["seq"], problem["eventId"])
            for problem in report["problems"]
        ],
        "entriesChecked": report["entriesChecked"],
        "checkpointsChecked": report["checkpointsChecked"],
        "firstSeq": report["firstSeq"],
        "lastSeq": report["lastSeq"],
        "unsignedEntries": report["unsignedEntries"],
        "unsignedSince": report.get("unsignedSince"),
        "retentionMonths": report["retentionMonths"],
    }


def summary_of_verification(result: chain.Verification) -> dict:
    return {
        "intact": result.intact,
        "problems": [
            (problem.kind, problem.seq, problem.event_id)
            for problem in result.problems
        ],
        "entriesChecked": result.entries_checked,
        "checkpointsChecked": result.checkpoints_checked,
        "firstSeq": result.first_seq,
        "lastSeq": result.last_seq,
        "unsignedEntries": result.unsigned_entries,
        "unsignedSince": (
            chain.utc_text(result.unsigned_since)
            if result.unsigned_since
            else None
        ),
        "retentionMonths": result.retention_months,
    }


def verify_both(
    tmp_path: Path,
    lines: list[str],
    trusted=(KEY,),
    retention_months: int | None = None,
) -> dict:
    """Verify an export with the standalone verifier and with
    chain.verify_export; assert they agree and return the report.

    `retention_months` overrides the export's, in both.
    """
    public_keys = [key.public_key() for key in trusted]
    arguments = []
    if retention_months is not None:
        arguments = ["--retention-months", str(retention_months)]
    completed = run_verifier(tmp_path, lines, public_keys, arguments)
    assert completed.returncode in (0, 3), completed.stderr
    report = json.loads(completed.stdout)
    expected = chain.verify_export(
        lines,
        {chain.public_key_id(key): key for key in public_keys},
        retention_months,
    )

    assert summary_of_verification(expected) == summary_of_report(report)
    assert (0 if report["intact"] else 3) == completed.returncode

    return report


def first_problem(report: dict) -> tuple[str, int]:
    problem = report["problems"][0]

    return problem["kind"], problem["seq"]


def edit_entry(lines: list[str], seq: int, **changes) -> list[str]:
    """Change fields of the entry line at `seq`, as an edit of the file
    would, without recomputing its hash."""
    edited = []
    for line in lines:
        record = json.loads(line)
        if record["type"] == "entry" and record["seq"] == seq:
            line = json.dumps({**record, **changes})
        edited.append(line)

    return edited


class TestIntact:
    def test_signed_export_intact(self, tmp_path):
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 4, month_end=MONTH_END),
            checkpoint_at(entries, 10),
        ]

        report = verify_both(tmp_path, export_lines(entries, points))

        assert report["intact"], report["problems"]
        assert 10 == report["entriesChecked"]
        assert 0 == report["unsignedEntries"]
        assert "unsignedSince" not in report

    def test_unsigned_tail_reported(self, tmp_path):
        entries = make_chain(10)

        report = verify_both(
            tmp_path, export_lines(entries, [checkpoint_at(entries, 7)])
        )

        assert report["intact"], report["problems"]
        assert 3 == report["unsignedEntries"]
        assert chain.utc_text(entries[7].time) == report["unsignedSince"]

    def test_no_checkpoint_yet_all_unsigned(self, tmp_path):
        """A chain younger than the first checkpoint run is intact, with
        every entry unsigned."""
        entries = make_chain(5)

        report = verify_both(tmp_path, export_lines(entries, []))

        assert report["intact"], report["problems"]
        assert 5 == report["unsignedEntries"]
        assert chain.utc_text(entries[0].time) == report["unsignedSince"]


class TestTampering:
    def test_altered_entry(self, tmp_path):
        entries = make_chain(10)
        lines = export_lines(entries, [checkpoint_at(entries, 10)])

        report = verify_both(tmp_path, edit_entry(lines, 5, status_code=403))

        assert ("altered", 5) == first_problem(report)
        assert str(entries[4].event_id) == report["problems"][0]["eventId"]

    def test_altered_and_rehashed_entry(self, tmp_path):
        """A rehashed entry breaks the next link and its checkpoint."""
        entries = make_chain(10)
        point = checkpoint_at(entries, 10)
        entries[4] = forge(entries[4], event_id=entries[4].event_id)

        report = verify_both(tmp_path, export_lines(entries, [point]))

        assert ("inserted", 6) == first_problem(report)

    @pytest.mark.parametrize("forged_first", [True, False])
    def test_inserted_entry_at_taken_seq(self, tmp_path, forged_first):
        """A forged row at a seq that a genuine row has is the one named,
        whichever comes first in the file."""
        entries = make_chain(6)
        point = checkpoint_at(entries, 6)
        forged = forge(entries[2])
        position = 2 if forged_first else 3
        entries.insert(position, forged)

        report = verify_both(tmp_path, export_lines(entries, [point]))

        assert [("inserted", 3, str(forged.event_id))] == [
            (problem["kind"], problem["seq"], problem["eventId"])
            for problem in report["problems"]
        ]

    def test_repeat_without_evidence(self, tmp_path):
        """With nothing to tell two rows apart, the first in the file is
        kept and the other is reported as possibly inserted."""
        entries = make_chain(4)
        forged = forge(entries[3])
        lines = export_lines([*entries, forged], [checkpoint_at(entries, 2)])

        report = verify_both(tmp_path, lines)

        [problem] = report["problems"]
        assert ("inserted", 4) == (problem["kind"], problem["seq"])
        assert str(forged.event_id) == problem["eventId"]
        assert "one of them was inserted" in problem["message"]

    def test_deleted_middle_entry(self, tmp_path):
        entries = make_chain(10)
        point = checkpoint_at(entries, 10)
        del entries[6]

        report = verify_both(tmp_path, export_lines(entries, [point]))

        assert ("deleted", 7) == first_problem(report)

    def test_deleted_newest_past_checkpoint(self, tmp_path):
        entries = make_chain(10)
        point = checkpoint_at(entries, 10)

        report = verify_both(tmp_path, export_lines(entries[:7], [point]))

        assert ("deleted", 8) == first_problem(report)
        assert "seq 10" in report["problems"][0]["message"]

    def test_bad_signature(self, tmp_path):
        entries = make_chain(10)
        point = checkpoint_at(entries, 10)
        broken = dataclasses.replace(
            point,
            signature=bytes([point.signature[0] ^ 1]) + point.signature[1:],
        )

        report = verify_both(tmp_path, export_lines(entries, [broken]))

        assert ("checkpoint", 10) == first_problem(report)
        assert 10 == report["unsignedEntries"]

    def test_checkpoint_of_untrusted_key(self, tmp_path):
        """The export's own copy of the signing key earns it no trust."""
        entries = make_chain(10)
        points = [checkpoint_at(entries, 5), checkpoint_at(entries, 10)]

        report = verify_both(
            tmp_path,
            export_lines(entries, points),
            trusted=(Ed25519PrivateKey.generate(),),
        )

        assert [("checkpoint", 5), ("checkpoint", 10)] == [
            (problem["kind"], problem["seq"]) for problem in report["problems"]
        ]
        assert "trusted key" in report["problems"][0]["message"]


class TestRetention:
    def test_export_after_cut_intact(self, tmp_path):
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 2),
            checkpoint_at(entries, 4, month_end=MONTH_END),
            checkpoint_at(entries, 10),
        ]

        report = verify_both(
            tmp_path, export_lines(entries[4:], points, last_removed_seq=4)
        )

        assert report["intact"], report["problems"]
        assert 5 == report["firstSeq"]
        assert 10 == report["lastSeq"]

    def test_cut_at_plain_checkpoint(self, tmp_path):
        """A cut must sit at a month end: elsewhere, entries before it
        were deleted."""
        entries = make_chain(10)
        points = [checkpoint_at(entries, 4), checkpoint_at(entries, 10)]

        report = verify_both(
            tmp_path, export_lines(entries[4:], points, last_removed_seq=4)
        )

        assert ("deleted", 4) == first_problem(report)

    def test_entry_after_cut_deleted(self, tmp_path):
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 4, month_end=MONTH_END),
            checkpoint_at(entries, 10),
        ]

        report = verify_both(
            tmp_path, export_lines(entries[5:], points, last_removed_seq=4)
        )

        assert ("deleted", 5) == first_problem(report)

    @pytest.mark.parametrize(
        ("export_time", "retention_months", "reason"),
        [
            # Four days after the month ended, as a fake cut would be.
            ("2024-12-04T00:00:00.000000Z", None, "at the end of 2024-11"),
            ("2025-11-30T23:59:59.999999Z", None, "of 12 months keeps"),
            # Valid with the export's 12 months, not with 13.
            (chain.utc_text(CUT_ALLOWED), 13, "of 13 months keeps"),
        ],
    )
    def test_cut_of_kept_month(
        self, tmp_path, export_time, retention_months, reason
    ):
        """A cut at a signed month end is still a deletion when the
        retention period kept that month at export time."""
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 4, month_end=MONTH_END),
            checkpoint_at(entries, 10),
        ]
        lines = export_lines(
            entries[4:], points, last_removed_seq=4, export_time=export_time
        )

        report = verify_both(
            tmp_path, lines, retention_months=retention_months
        )

        assert ("deleted", 4) == first_problem(report)
        assert reason in report["problems"][0]["message"]
        assert (retention_months or 12) == report["retentionMonths"]

    def test_cut_checked_with_given_months(self, tmp_path):
        """--retention-months 3 accepts a cut that the export's 12 months
        reject."""
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 4, month_end=MONTH_END),
            checkpoint_at(entries, 10),
        ]
        lines = export_lines(
            entries[4:],
            points,
            last_removed_seq=4,
            export_time="2025-03-01T00:00:00.000000Z",
        )

        report = verify_both(tmp_path, lines, retention_months=3)

        assert report["intact"], report["problems"]
        assert 3 == report["retentionMonths"]

    def test_cut_without_retention_months(self, tmp_path):
        """An export from before the header had retention_months is checked
        with the default of 12 months."""
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 4, month_end=MONTH_END),
            checkpoint_at(entries, 10),
        ]
        lines = export_lines(
            entries[4:], points, last_removed_seq=4, retention_months=None
        )

        report = verify_both(tmp_path, lines)

        assert report["intact"], report["problems"]
        assert 12 == report["retentionMonths"]

    @pytest.mark.parametrize(
        ("recent", "header_changes"),
        [
            (True, {"export_time": "2099-01-01T00:00:00.000000Z"}),
            (False, {"retention_months": 1}),
            (
                True,
                {
                    "export_time": "2099-01-01T00:00:00.000000Z",
                    "retention_months": 1,
                },
            ),
        ],
    )
    def test_edited_header_cannot_allow_cut(
        self, tmp_path, recent, header_changes
    ):
        """The header is not signed: a later export_time or a shorter
        retention_months does not make a cut of a kept month valid. A
        later export_time counts only up to the current time, so its case
        cuts at the end of last month by the real clock."""
        entries = make_chain(10)
        month_end = MONTH_END
        if recent:
            today = datetime.datetime.now(datetime.UTC).date()
            month_end = today.replace(day=1) - datetime.timedelta(days=1)
        points = [
            checkpoint_at(entries, 4, month_end=month_end),
            checkpoint_at(entries, 10),
        ]
        kept = chain.utc_text(CUT_ALLOWED - datetime.timedelta(days=1))
        lines = export_lines(
            entries[4:], points, last_removed_seq=4, export_time=kept
        )
        lines[0] = json.dumps(json.loads(lines[0]) | header_changes)

        report = verify_both(tmp_path, lines)

        assert ("deleted", 4) == first_problem(report)

    @pytest.mark.parametrize(
        "header_changes",
        [
            {"retention_months": 10**9},
            {"retention_months": True},
            {"retention_months": 0},
            {"export_time": "2026-12-04T22:54:29"},
        ],
    )
    def test_invalid_header_rejected(self, tmp_path, header_changes):
        """Both verifiers reject the header as invalid input, without a
        traceback."""
        entries = make_chain(4)
        lines = export_lines(entries, [checkpoint_at(entries, 4)])
        lines[0] = json.dumps(json.loads(lines[0]) | header_changes)

        completed = run_verifier(tmp_path, lines)

        assert 2 == completed.returncode, completed.stderr
        assert "Traceback" not in completed.stderr
        with pytest.raises(ValueError, match="line 1 of the export"):
            chain.verify_export(lines, {})

    def test_everything_cut_intact(self, tmp_path):
        """A chain whose every entry was cut ends at the cut, and the
        checkpoints before it prove nothing missing."""
        entries = make_chain(10)
        points = [
            checkpoint_at(entries, 5),
            checkpoint_at(entries, 10, month_end=MONTH_END),
        ]
        lines = export_lines([], points, last_removed_seq=10)

        report = verify_both(tmp_path, lines)

        assert report["intact"], report["problems"]
        assert 0 == report["unsignedEntries"]


class TestEarlierExport:
    def test_deleted_checkpoints_caught(self, tmp_path):
        """Deleting the newest entries and every checkpoint leaves a chain
        that verifies alone, but not against a kept export."""
        entries = make_chain(10)
        earlier = tmp_path / "earlier.ndjson"
        earlier.write_text(
            "\n".join(export_lines(entries, [checkpoint_at(entries, 10)]))
        )
        lines = export_lines(entries[:8], [])

        alone = run_verifier(tmp_path, lines)
        compared = run_verifier(
            tmp_path, lines, arguments=["--earlier-export", str(earlier)]
        )

        assert 0 == alone.returncode, alone.stdout
        assert 3 == compared.returncode, compared.stdout
        problem = json.loads(compared.stdout)["problems"][0]
        assert ("deleted", 9) == (problem["kind"], problem["seq"])

    def test_missing_earlier_checkpoint(self, tmp_path):
        entries = make_chain(10)
        points = [checkpoint_at(entries, 5), checkpoint_at(entries, 10)]
        earlier = tmp_path / "earlier.ndjson"
        earlier.write_text("\n".join(export_lines(entries, points)))

        completed = run_verifier(
            tmp_path,
            export_lines(entries, points[1:]),
            arguments=["--earlier-export", str(earlier)],
        )

        assert 3 == completed.returncode, completed.stdout
        [problem] = json.loads(completed.stdout)["problems"]
        assert ("checkpoint", 5) == (problem["kind"], problem["seq"])
        assert "never deleted" in problem["message"]

    def test_other_chain_rejected(self, tmp_path):
        entries = make_chain(3)
        other = export_lines(entries, [])
        other[0] = json.dumps(
            {
                "type": "export",
                "chain_id": str(uuid.uuid4()),
                "last_removed_seq": 0,
            }
        )
        earlier = tmp_path / "other.ndjson"
        earlier.write_text("\n".join(other))

        completed = run_verifier(
            tmp_path,
            export_lines(entries, []),
            arguments=["--earlier-export", str(earlier)],
        )

        assert 2 == completed.returncode
        assert "not " + str(CHAIN) in completed.stderr


class TestInvalidInput:
    def test_no_header_line(self, tmp_path):
        entries = make_chain(3)

        completed = run_verifier(tmp_path, export_lines(entries, [])[1:])

        assert 2 == completed.returncode
        assert '"type": "export"' in completed.stderr
        assert "" == completed.stdout

    def test_line_not_json(self, tmp_path):
        lines = export_lines(make_chain(3), [])
        lines[2] = lines[2][:40]

        completed = run_verifier(tmp_path, lines)

        assert 2 == completed.returncode
        assert "line 3" in completed.stderr

    def test_entry_missing_field(self, tmp_path):
        lines = export_lines(make_chain(3), [])
        record = json.loads(lines[1])
        del record["prev_hash"]
        lines[1] = json.dumps(record)

        completed = run_verifier(tmp_path, lines)

        assert 2 == completed.returncode
        assert "entry line is missing prev_hash" in completed.stderr

    @pytest.mark.parametrize(
        ("pem", "error"),
        [
            (b"not a key\n", "invalid public key"),
            (
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                ),
                "is not an Ed25519 key",
            ),
        ],
    )
    def test_public_key_unusable(self, tmp_path, pem, error):
        key_file = tmp_path / "operator.pub"
        key_file.write_bytes(pem)

        completed = run_verifier(
            tmp_path,
            export_lines(make_chain(2), []),
            trusted=(),
            arguments=["--public-key", str(key_file)],
        )

        assert 2 == completed.returncode
        assert error in completed.stderr
        assert str(key_file) in completed.stderr


def test_verifier_imports_only_stdlib_and_cryptography():
    """The verifier runs where arxio is not installed. `python -I` alone
    does not prove that here: the project's editable install adds an
    import finder for `services` through a .pth file in this virtualenv's
    site-packages, which `-I` still reads."""
    tree = ast.parse(VERIFIER.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.Name):
            assert node.id != "__import__"

    outside = modules - set(sys.stdlib_module_names) - {"cryptography"}
    assert set() == outside
    assert "importlib" not in modules


def test_documented_entry_example_hashes():
    """The worked example in docs/audit.md is what the chain computes."""
    lines = (ROOT / "docs" / "audit.md").read_text().splitlines()
    entry_line = next(
        line.strip()
        for line in lines
        if line.strip().startswith('{"type": "entry"')
    )
    canonical_line = next(
        line for line in lines if line.startswith('{"action":')
    )
    record = json.loads(entry_line)
    entry = chain.Entry.from_json(record)

    assert canonical_line.encode() == chain.canonical_json(
        entry.hashed_fields()
    )
    assert record["hash"] == chain.entry_hash(entry.hashed_fields()).hex()
    assert record["hash"] in "\n".join(lines).split(canonical_line)[1]
