"""Write the "Faults" section of docs/benchmarks.md from the fault figures.

    .venv/bin/python bench/faults_report.py [--print]

The fault tests (tests/e2e/test_faults_*.py, part of `make test`) and the
soak (`make soak`) each write .run/faults/NAME.json. This script puts one
row per file into a table. It replaces only the "Faults" section of the
document, because the other sections belong to other benchmarks.
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    BENCHMARKS_DOC,
    cpu_model,
    write_section,
)

SECTION_HEADING = "## Faults"
FIGURES_DIR = REPO_ROOT / ".run" / "faults"
# Rows in the order of the fault list; unknown files follow by name.
ORDER = (
    "database-restart",
    "model-stalled-killed",
    "auth-killed",
    "sigterm-cds-2",
    "sigterm-auth-2",
    "soak",
)
SOURCES = {
    "database-restart": "tests/e2e/test_faults_database.py",
    "model-stalled-killed": "tests/e2e/test_faults_model.py",
    "auth-killed": "tests/e2e/test_faults_auth.py",
    "sigterm-cds-2": "tests/e2e/test_faults_sigterm.py",
    "sigterm-auth-2": "tests/e2e/test_faults_sigterm.py",
    "soak": "bench/soak.py",
}

INTRO = """\
Each fault test starts a suite of its own on loopback ports, sends
requests from client threads while it breaks one part, and records what
the clients saw. "Failed" counts every response that was not the
expected one, so for an outage it counts the 503 responses while the part
was down. "Recovered after" runs from the part's return to the end of
the last failed request for the database, to the first request passed
once auth reports SERVING again, and, for the model, from the runtime's
restart to the first review it replied to. "Entries lost" counts responses
whose request id has no audit entry once the ingester caught up.
"Result" is the test's own verdict on the run: "failed" also covers a test
that was interrupted, only a "passed" row met every check, and "unknown"
marks figures written before the tests recorded their result. The
figures come from the last run of each test (`make test`, or `make soak`
for the soak) on the machine below; `make faults-report` rewrites this
section from .run/faults/*.json.

The soak compares each process's memory at the end of its warm-up with
its memory at the end of the run. PostgreSQL is judged as a whole, the
private memory of its processes that ran throughout added up, and by
each client backend. A backend that opened during the run gets a
warm-up of its own, as long as the run's. The default warm-up, 5
minutes, is about how long a backend's heap grows to what its largest
queries need, while its live memory stays flat."""


def load_figures(folder: Path) -> list[dict]:
    """Return every fault record under `folder`, in the table's order."""
    records = [json.loads(path.read_text()) for path in folder.glob("*.json")]
    rank = {name: index for index, name in enumerate(ORDER)}

    return sorted(
        records, key=lambda r: (rank.get(r["fault"], len(ORDER)), r["fault"])
    )


def result(record: dict) -> str:
    """Return the Result cell: passed, failed, or unknown for old files."""
    passed = record.get("passed")
    if passed is None:
        return "unknown"

    return "passed" if passed is True else "**failed**"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def machine() -> str:
    model = cpu_model()
    load = os.getloadavg()[0]

    return (
        f"{os.cpu_count()} CPUs ({model}), Python "
        f"{sys.version.split()[0]}; load average {load:.2f} when this "
        "section was written, from other work sharing the machine"
    )


def section(records: list[dict]) -> str:
    lines = [
        SECTION_HEADING,
        "",
        INTRO,
        "",
        "| Fault | Result | Requests sent | Failed | Recovered after "
        "| Entries lost | Notes | Run |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for record in records:
        source = SOURCES.get(record["fault"], "")
        lines.append(
            f"| {_cell(record['summary'])} | {result(record)} | "
            f"{record['requests_sent']} | "
            f"{record['requests_failed']} | "
            f"{_seconds(record['recovered_after_seconds'])} | "
            f"{record['entries_lost']} | {_cell(record['notes'])} | "
            f"`{source}`, {record['date'][:10]} |"
        )
    if not records:
        lines.append("| no fault figures yet: run `make test` | | | | | | | |")
    lines += ["", f"Machine: {machine()}.", ""]

    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--print",
        action="store_true",
        help="print the section instead of writing docs/benchmarks.md",
    )
    args = parser.parse_args()
    text = section(load_figures(FIGURES_DIR))
    if args.print:
        print(text)
        return 0
    write_section(SECTION_HEADING, text)
    print(f"wrote the Faults section of {BENCHMARKS_DOC}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
