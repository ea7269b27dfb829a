"""`make bench` runs end to end in a tiny mode and writes its report.

The harness starts a suite of its own, runs every scenario for about a
second against its baseline and writes its section into a copy of
docs/benchmarks.md. The checks are on the report's shape and on figures
that any working run has (requests completed, the machine described),
not on speeds, which depend on the machine.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest

from bench.common import BENCHMARKS_DOC, REPO_ROOT, RUN_ROOT
from bench.harness import SCENARIOS
from bench.model_scenario import RAW_CPU_NAME, model_unavailable_reason
from bench.report import COLUMNS, SECTION_HEADING, TABLE_HEADER

pytestmark = pytest.mark.e2e

HARNESS = REPO_ROOT / "bench" / "harness.py"
COMPARISONS = tuple(name for name in SCENARIOS if name != "open_loop")
MS = re.compile(r"^\d+\.\d ms$")
SERVER_MS = re.compile(r"^(≤ |> )[\d.]+ ms$|^—$")
MACHINE_ROWS = ("CPU", "cores", "memory", "Python", "Envoy", "PostgreSQL")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the harness in its tiny mode; return its process, the page it
    wrote and its figures."""
    folder = tmp_path_factory.mktemp("bench")
    output = folder / "benchmarks.md"
    shutil.copy(BENCHMARKS_DOC, output)
    figures = folder / "figures.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "--seconds",
            "1",
            "--model-seconds",
            "1",
            "--warmup-seconds",
            "0",
            "--rounds",
            "1",
            "--concurrency",
            "4",
            "--audit-entries",
            "2000",
            "--output",
            str(output),
            "--figures",
            str(figures),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
        check=False,
    )
    page = output.read_text() if output.exists() else ""
    numbers = json.loads(figures.read_text()) if figures.exists() else {}

    return completed, page, numbers


def section_of(page: str) -> str:
    start = page.index(SECTION_HEADING + "\n")
    end = page.find("\n## ", start + len(SECTION_HEADING))

    return page[start:] if end < 0 else page[start : end + 1]


def table_after(section: str, header: str) -> list[list[str]]:
    """Return the cells of each row of the table that starts at header."""
    lines = section[section.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])

    return rows


def model_available() -> bool:
    return model_unavailable_reason(RUN_ROOT / "models") is None


def test_harness_exits_zero(run):
    completed, _, _ = run
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_other_sections_kept(run):
    _, page, _ = run
    original = BENCHMARKS_DOC.read_text()
    headings = [line for line in original.splitlines() if line[:3] == "## "]
    for heading in headings:
        assert page.splitlines().count(heading) == 1, heading


def test_section_written_once(run):
    _, page, _ = run
    assert page.splitlines().count(SECTION_HEADING) == 1


def test_scenario_table_shape(run):
    _, page, _ = run
    rows = table_after(section_of(page), TABLE_HEADER)
    assert len(rows) == 2 * len(COMPARISONS)
    for row in rows:
        assert len(row) == COLUMNS, row


def test_measured_rows_have_figures(run):
    _, page, _ = run
    rows = table_after(section_of(page), TABLE_HEADER)
    for index, row in enumerate(rows):
        if row[1].startswith("skipped"):
            continue
        title, rate, p50, p99, server_p50, server_p99, cpu, failed = row[:8]
        assert float(rate.replace(",", "")) > 0, title
        assert MS.match(p50), (title, p50)
        assert MS.match(p99), (title, p99)
        assert SERVER_MS.match(server_p50), (title, server_p50)
        assert SERVER_MS.match(server_p99), (title, server_p99)
        assert float(cpu) >= 0, title
        assert int(failed) >= 0, title
        if index % 2 == 0:
            assert float(row[8]) > 0, title


def test_model_skipped_only_without_runtime(run):
    _, _, numbers = run
    skipped = numbers["model_review"]["skipped"]
    if model_available():
        assert skipped == ""
    else:
        assert skipped.startswith("the model runtime is unavailable")


@pytest.fixture
def model_figures(run) -> dict:
    """Return the model review's figures, or skip without the model."""
    if not model_available():
        pytest.skip("the model runtime is unavailable")
    _, _, numbers = run

    return numbers["model_review"]


def test_model_baseline_own_process(model_figures):
    facts = model_figures["facts"]
    assert facts["baseline_pid"] != facts["harness_pid"]
    assert facts["baseline_pid"] != facts["runtime_pid"]
    cpu = model_figures["baseline"]["cpu_seconds"]
    assert list(cpu) == [RAW_CPU_NAME]
    assert cpu[RAW_CPU_NAME] > 0


def test_model_baseline_runtime_settings(model_figures):
    facts = model_figures["facts"]
    assert facts["runtime_settings"]["n_threads"] >= 1
    assert facts["baseline_settings"] == facts["runtime_settings"]
    # The launcher pins libgomp's wait policy, which otherwise changes with
    # the number of connections the runtime has served.
    environment = facts["runtime_settings"]["environment"]
    assert environment.get("OMP_WAIT_POLICY") == "PASSIVE"


def test_model_paths_same_summary(model_figures):
    assert model_figures["facts"].get("same_summary") is True


def test_servers_counted_requests(run):
    _, _, numbers = run
    for key in COMPARISONS:
        if numbers[key]["skipped"]:
            continue
        for side in ("measured", "baseline"):
            figures = numbers[key][side]
            assert figures["requests"] > 0, (key, side)
            if figures["counted_by"] != "server":
                continue
            # The server counted every request that the client saw
            # complete, and at most the failed ones besides: a 200 whose
            # body failed the client's check.
            assert figures["requests"] >= figures["client_requests"], (
                key,
                side,
            )
            max_requests = figures["client_requests"] + figures["failed"]
            assert figures["requests"] <= max_requests, (key, side)


def test_targets_table_results(run):
    _, page, _ = run
    rows = table_after(section_of(page), "| target | figure | result |")
    assert len(rows) == 3
    for name, _, result in rows:
        allowed = {"met", "missed"}
        if name.startswith("model path") and not model_available():
            allowed = {"skipped"}
        assert result in allowed, (name, result)


def test_machine_described(run):
    _, page, _ = run
    rows = dict(table_after(section_of(page), "| machine | |"))
    for name in MACHINE_ROWS:
        assert rows.get(name), name
    assert rows["cores"].split()[0].isdigit()
    assert re.match(r"^\d+\.\d+\.\d+", rows["Envoy"])


def test_scaling_verdict_per_configuration(run):
    _, page, _ = run
    lines = section_of(page).splitlines()
    start = next(
        index
        for index, line in enumerate(lines)
        if line.startswith("Scaling past one process on ")
    )
    verdicts = [line for line in lines[start + 1 :] if line.startswith("- ")]
    configurations = verdicts[:2]
    assert len(configurations) == 2
    assert "behind the edge" in configurations[0]
    assert "CDS service called directly" in configurations[1]
    for line in configurations:
        assert re.search(r"(scaled|did not scale): ", line), line
