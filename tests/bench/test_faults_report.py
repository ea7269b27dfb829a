"""The Faults table shows each test's result, and fault tests record it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.faults_report import section
from services.launcher.stack import REPO_ROOT

RECORD = {
    "fault": "auth-killed",
    "date": "2026-01-02T03:04:05+00:00",
    "summary": "auth killed",
    "requests_sent": 10,
    "requests_failed": 2,
    "recovered_after_seconds": 0.5,
    "entries_lost": 0,
    "notes": "",
}

FAULT_TESTS = """
import os
from pathlib import Path

from tests.e2e import fault_load

fault_load.FIGURES_DIR = Path(os.environ["FIGURES_DIR"])


def test_passes():
    fault_load.write_figures("passing", {"requests_sent": 1})


def test_fails():
    fault_load.write_figures("failing", {"requests_sent": 1})
    assert False


def test_interrupted():
    fault_load.write_figures("interrupted", {"requests_sent": 1})
    raise KeyboardInterrupt
"""


def table_row(record: dict) -> str:
    text = section([record])
    rows = [line for line in text.splitlines() if "auth killed" in line]
    assert len(rows) == 1, text

    return rows[0]


def test_table_has_result_column():
    header = section([]).splitlines()
    assert any(line.startswith("| Fault | Result |") for line in header)


def test_failed_record_renders_failed():
    row = table_row(RECORD | {"passed": False})
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[2] == "**failed**"


def test_passed_record_renders_passed():
    row = table_row(RECORD | {"passed": True})
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[2] == "passed"


def test_record_without_result_not_passed():
    row = table_row(RECORD)
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[2] == "unknown"


def test_fault_tests_record_result(tmp_path: Path):
    tests_file = tmp_path / "test_figures.py"
    tests_file.write_text(FAULT_TESTS)
    figures_dir = tmp_path / "faults"
    environment = dict(os.environ)
    environment |= {
        "FIGURES_DIR": str(figures_dir),
        "PYTHONPATH": str(REPO_ROOT),
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.e2e.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tests_file),
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr

    def passed(name: str) -> bool:
        path = figures_dir / f"{name}.json"
        assert path.exists(), output
        return json.loads(path.read_text())["passed"]

    assert passed("passing") is True
    assert passed("failing") is False
    assert passed("interrupted") is False
