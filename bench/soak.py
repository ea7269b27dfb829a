"""Soak the whole suite at a steady rate and watch every process's memory.

    .venv/bin/python bench/soak.py [--minutes 15] [--warm-up-minutes 5]
        [--rate 40] [--model-every 30] [--no-model]

Starts its own suite on loopback ports (the real model runtime unless
--no-model), sends rules-only reviews over REST and native gRPC and audit
pages at a steady rate, plus one review with the model every
--model-every seconds, and samples the memory of every process. It passes
when no request fails (a model review fails unless its modelReview.status
is OK), no service returned INTERNAL, UNKNOWN or DATA_LOSS, the ingester
stored every entry, every child of the suite still runs at the end, and
no judged memory grew 10% or more from the end of its warm-up to the end
of the run (see judged).

Memory is the resident set size of each child of the suite, and the
memory in private mappings of each PostgreSQL process. Their shared
buffer pool is left out: it fills up to `shared_buffers` as the audit
table grows, which is a bounded cache rather than a leak.

The warm-up lasts 5 minutes because a PostgreSQL backend's private
memory grows for about that long after the backend starts, then levels
off. Its live memory, as pg_log_backend_memory_contexts reports it,
stays flat, but the heap keeps what the largest transient queries freed.
So a backend that the pool opens during the run gets a warm-up of the
same length from its own start. The default run then measures 10
minutes after the warm-up.
Figures go to .run/faults/soak.json; `make soak` then updates the
"Faults" section of docs/benchmarks.md. Exits 1 when a check fails.
"""

import argparse
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.launcher.processes import ChildProcess  # noqa: E402
from tests.e2e.fault_load import (  # noqa: E402
    AUDIT_PAGE_PATH,
    REVIEW_PATH,
    RUN_ROOT,
    WITH_MODEL,
    Recorder,
    grpc_review_sender,
    guarded,
    has_interaction,
    latency_ms,
    mark_figures_stale,
    missing_entries,
    rest_sender,
    review_sender,
    sample_sum,
    scrape,
    write_figures,
)
from tests.edge import EdgeClient  # noqa: E402
from tests.suite import Organization, own_stack  # noqa: E402

# The memory of the PostgreSQL processes that ran from the end of the
# warm-up to the end of the run, together.
POSTGRES_TOTAL = "postgres (processes that ran throughout)"
# Largest growth of a process's memory after the warm-up, as a fraction.
MAX_GROWTH = 0.10
# Samples averaged at each end of the measured span, against noise.
EDGE_SAMPLES = 3
# Requests in flight at once; the rate drops when all are busy.
MAX_IN_FLIGHT = 32
# gRPC codes that mean a bug rather than a decision.
ERROR_CODES = ("INTERNAL", "UNKNOWN", "DATA_LOSS")
# The failure of a soak whose child processes did not all run to the end.
NOT_RUNNING = "processes not running at the end"
# The "test" that the soak's figures name, so that the next run finds
# them to mark stale.
SOAK_ID = "bench/soak.py"
# modelReview.status of a review whose model call succeeded (the
# ModelReview.Status enum in protos/arxio/cds/v1/cds.proto).
MODEL_OK = "OK"


def resident_kib(pid: int) -> int:
    """Return a process's resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

    return 0


def private_kib(pid: int) -> int:
    """Return a process's memory in private mappings, in KiB.

    Shared mappings (PostgreSQL's buffer pool) are left out even where
    only this process touched a page, which smaps counts as private.
    Returns 0 once the process ended.
    """
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0
    total = 0
    shared_mapping = False
    for line in text.splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            # A mapping's header: address range, permissions such as
            # "rw-p" (private) or "rw-s" (shared), offset, device, inode.
            shared_mapping = fields[1].endswith("s")
        elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
            if not shared_mapping:
                total += int(fields[1])

    return total


def process_tree(pid: int) -> list[int]:
    """Return `pid` and its children (PostgreSQL's backends and workers)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == pid:
                children.append(int(status.parent.name))
                break

    return [pid, *children]


def memory_sample(stack) -> dict[str, int]:
    """Return KiB of memory per process name."""
    sample = {
        child.name: resident_kib(child.process.pid)
        for child in stack.children
        if child.running()
    }
    postmaster = stack.database_pid()
    if postmaster is not None:
        for pid in process_tree(postmaster):
            kib = private_kib(pid)
            sample[f"postgres {pid} ({postgres_role(pid)})"] = kib

    return sample


def postgres_role(pid: int) -> str:
    """Return a PostgreSQL process's kind or, for a backend, its user."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "ended"
    words = command.replace(b"\0", b" ").decode(errors="replace").split()
    if len(words) < 2 or words[0] != "postgres:":
        return "postmaster"
    if words[1].startswith("arxio_") or words[1] == "postgres":
        return f"backend of {words[1]}"

    return " ".join(words[1:3])


def is_backend(name: str) -> bool:
    """Tell whether a sampled name is a PostgreSQL client backend."""
    return name.startswith("postgres ") and "(backend of " in name


def judged(name: str) -> bool:
    """Tell whether a process's growth counts toward the verdict.

    PostgreSQL counts as one server, the sum of its processes that ran
    throughout, and each of its client backends counts on its own. A
    helper process such as the checkpointer is reported but not judged
    alone: at a few hundred KiB it grows by tens of percent when it
    touches one more page.
    """
    if name == POSTGRES_TOTAL or is_backend(name):
        return True

    return not name.startswith("postgres ")


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def _figures(before: float, after: float, baseline_sample: int) -> dict:
    return {
        "after_warm_up_mib": round(before / 1024, 1),
        "end_mib": round(after / 1024, 1),
        "growth": round(after / before - 1, 4) if before else None,
        "baseline_sample": baseline_sample,
    }


def growth(samples: list[dict[str, int]], warm_up_end: int) -> dict:
    """Compare each process's memory after its warm-up and at the end.

    A process that ran from the start is measured from `warm_up_end`, the
    first sample after the warm-up. A PostgreSQL backend that the pool
    opened later gets a warm-up of the same length from its own first
    sample, and one opened too late for that is left out: see
    late_backends. The PostgreSQL total adds up the processes that ran
    from the warm-up's end to the end of the run.
    """
    end = samples[-EDGE_SAMPLES:]
    at_end = set.intersection(*(set(sample) for sample in end))
    first_seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        for name in sample:
            first_seen.setdefault(name, index)
    start = samples[warm_up_end : warm_up_end + EDGE_SAMPLES]
    throughout = at_end.intersection(*(set(sample) for sample in start))
    postgres = [name for name in throughout if name.startswith("postgres ")]
    result = {}
    if postgres:
        totals = [
            sum(sample[name] for name in postgres) for sample in start + end
        ]
        result[POSTGRES_TOTAL] = _figures(
            mean(totals[:EDGE_SAMPLES]),
            mean(totals[EDGE_SAMPLES:]),
            warm_up_end,
        )
    for name in sorted(at_end):
        baseline = warm_up_end
        if is_backend(name):
            baseline = max(warm_up_end, first_seen[name] + warm_up_end)
        if baseline + EDGE_SAMPLES > len(samples) - EDGE_SAMPLES:
            continue
        window = samples[baseline : baseline + EDGE_SAMPLES]
        if not all(name in sample for sample in window):
            continue
        result[name] = _figures(
            mean([sample[name] for sample in window]),
            mean([sample[name] for sample in end]),
            baseline,
        )

    return result


def late_backends(samples: list[dict[str, int]], memory: dict) -> list[str]:
    """Return the PostgreSQL backends running at the end whose own
    warm-up had not ended early enough to measure their growth."""
    running = set(samples[-1])

    return sorted(
        name for name in running if is_backend(name) and name not in memory
    )


def postgres_connections(
    samples: list[dict[str, int]], warm_up_end: int
) -> dict[str, int]:
    """Count PostgreSQL's client backends after the warm-up and at the end."""

    def count(sample: dict[str, int]) -> int:
        return sum(is_backend(name) for name in sample)

    return {
        "after_warm_up": count(samples[warm_up_end]),
        "end": count(samples[-1]),
    }


def memory_notes(memory: dict) -> str:
    """Name the largest judged growth of the suite and of PostgreSQL."""
    parts = []
    for label, is_postgres in (("suite", False), ("PostgreSQL", True)):
        names = [
            n
            for n in memory
            if judged(n) and n.startswith("postgres ") == is_postgres
        ]
        if not names:
            continue
        name = max(names, key=lambda n: memory[n]["growth"] or 0.0)
        figures = memory[name]
        if figures["growth"] is None:
            parts.append(f"{label} memory not measured ({name})")
            continue
        parts.append(
            f"largest {label} growth after warm-up {figures['growth']:.1%} "
            f"({name}, {figures['after_warm_up_mib']} to "
            f"{figures['end_mib']} MiB)"
        )

    return "; ".join(parts)


def steady_load(senders, rate: float, stop: threading.Event, recorder):
    """Send requests round-robin at `rate` a second until `stop` is set."""
    slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def send(sender) -> None:
        try:
            recorder.add(sender())
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        due = time.monotonic()
        count = 0
        while not stop.is_set():
            slots.acquire()
            pool.submit(send, senders[count % len(senders)])
            count += 1
            due += 1 / rate
            time.sleep(max(0.0, due - time.monotonic()))


def periodic(sender, every: float, stop: threading.Event, recorder) -> None:
    while not stop.wait(every):
        recorder.add(sender())


def model_review_problem(review: dict) -> str | None:
    """Return a problem unless the review has the interaction and its
    model review succeeded (status OK rather than UNAVAILABLE, which a
    timed-out model call returns, or INVALID)."""
    problem = has_interaction(review)
    if problem is not None:
        return problem
    model_review = review["modelReview"]
    if model_review["status"] != MODEL_OK:
        return (
            f"modelReview.status {model_review['status']}, expected "
            f"{MODEL_OK}: {model_review.get('reason', '')}"
        )

    return None


def stopped_processes(children: list[ChildProcess]) -> list[str]:
    """Return the names of the suite's children that are not running."""
    return sorted(child.name for child in children if not child.running())


def verdict_text(failures: dict[str, int], stopped: list[str]) -> str:
    """Return "passed" or "failed: " and the checks that failed, naming
    the processes that were not running at the end."""
    names = [
        name
        for name, count in failures.items()
        if count and name != NOT_RUNNING
    ]
    if stopped:
        names.append(f"{NOT_RUNNING} ({', '.join(stopped)})")
    if not names:
        return "passed"

    return "failed: " + ", ".join(names)


def service_errors(stack) -> dict[str, float]:
    """Count the RPCs that each service ended with a bug's status code."""
    errors = {}
    for name in stack.metrics_ports:
        if name in ("envoy", "audit-ingest"):
            continue
        samples = scrape(stack.metrics_ports[name])
        errors[name] = sum(
            sample_sum(samples, "grpc_server_handled_total", grpc_code=code)
            for code in ERROR_CODES
        )

    return errors


def run(args: argparse.Namespace) -> dict:
    settings = {"model_timeout": 30.0}
    if not args.no_model:
        settings |= {"rules_only": False, "model_dir": RUN_ROOT / "models"}
    with own_stack(**settings) as stack:
        edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
        org = Organization(stack, "enterprise")
        key = {"x-api-key": org.api_key}
        senders = [
            guarded(sender, kind)
            for sender, kind in (
                (review_sender(edge, key), "review"),
                (grpc_review_sender(edge, org.api_key), "grpc review"),
                (
                    rest_sender(
                        edge, "audit page", "GET", AUDIT_PAGE_PATH, None, key
                    ),
                    "audit page",
                ),
            )
        ]
        model_sender = guarded(
            rest_sender(
                edge,
                "model review",
                "POST",
                REVIEW_PATH,
                WITH_MODEL,
                key,
                model_review_problem,
            ),
            "model review",
        )
        recorder = Recorder()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=steady_load, args=(senders, args.rate, stop, recorder)
            )
        ]
        if not args.no_model:
            threads.append(
                threading.Thread(
                    target=periodic,
                    args=(model_sender, args.model_every, stop, recorder),
                )
            )
        samples = []
        warm_up_end = 0
        started = time.monotonic()
        warm_up_until = started + args.warm_up_minutes * 60
        end = started + args.minutes * 60
        for thread in threads:
            thread.start()
        try:
            while time.monotonic() < end:
                samples.append(memory_sample(stack))
                if time.monotonic() < warm_up_until:
                    warm_up_end = len(samples)
                time.sleep(args.sample_seconds)
            samples.append(memory_sample(stack))
        finally:
            stop.set()
            elapsed = time.monotonic() - started
            for thread in threads:
                thread.join(120)
        # A child that ended (killed for memory, crashed) drops out of
        # the samples, so it fails the soak here by name.
        stopped = stopped_processes(stack.children)
        outcomes = recorder.snapshot()
        failed = [o for o in outcomes if not o.ok]
        missing = missing_entries(stack, recorder.request_ids())
        errors = service_errors(stack)
        memory = growth(samples, warm_up_end)
        late = late_backends(samples, memory)
        connections = postgres_connections(samples, warm_up_end)
        series = {
            name: [sample.get(name) for sample in samples]
            for name in sorted(set().union(*samples))
        }
        processes = {
            "after_warm_up": sorted(samples[warm_up_end]),
            "end": sorted(samples[-1]),
        }

    model_reviews = sum(o.kind == "model review" for o in outcomes)
    failures = {
        "requests failed": len(failed),
        # A soak with the model that sent no model review proves nothing
        # about the model path.
        "no model review sent": int(not args.no_model and not model_reviews),
        "entries lost": len(missing),
        "service errors": int(sum(errors.values())),
        # A baseline of 0 KiB means that the memory could not be read.
        "memory not measured": sum(
            figures["growth"] is None
            for name, figures in memory.items()
            if judged(name)
        ),
        "memory growth over 10%": sum(
            (figures["growth"] or 0.0) >= MAX_GROWTH
            for name, figures in memory.items()
            if judged(name)
        ),
    }

    failures[NOT_RUNNING] = len(stopped)
    verdict = verdict_text(failures, stopped)
    passed = verdict == "passed"

    return {
        "test": SOAK_ID,
        "summary": f"{args.minutes:g} minutes at {args.rate:g} requests a "
        f"second, {args.warm_up_minutes:g} of them warm-up",
        "requests_sent": len(outcomes),
        "requests_failed": len(failed),
        "recovered_after_seconds": None,
        "entries_lost": len(missing),
        "notes": (
            f"{verdict}; achieved {len(outcomes) / elapsed:.1f} requests a "
            f"second; {memory_notes(memory)}; PostgreSQL connections "
            f"{connections['after_warm_up']} after warm-up, "
            f"{connections['end']} at the end, {len(late)} of them opened "
            "too late for a warm-up of their own; INTERNAL, UNKNOWN or "
            f"DATA_LOSS responses {int(sum(errors.values()))}"
        ),
        "passed": passed,
        "failures": failures,
        "processes_not_running": stopped,
        "failed_examples": [(o.kind, o.status, o.detail) for o in failed[:10]],
        "memory": memory,
        "postgres_backends_not_judged": late,
        "postgres_connections": connections,
        # KiB of each process at each sample, None where it was not running.
        "memory_series": {
            "sample_seconds": args.sample_seconds,
            "kib": series,
        },
        "processes": processes,
        "latency": {
            kind: latency_ms([o for o in outcomes if o.kind == kind])
            for kind in ("review", "grpc review", "audit page", "model review")
        },
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, exiting with status 2 on an invalid value."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="run length in minutes"
    )
    parser.add_argument(
        "--warm-up-minutes",
        type=float,
        default=5.0,
        help="minutes of load before the memory baseline",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=40.0,
        help="rules-only requests a second, over REST and gRPC",
    )
    parser.add_argument(
        "--model-every",
        type=float,
        default=30.0,
        help="seconds between two reviews with the model",
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=10.0,
        help="seconds between two memory samples",
    )
    parser.add_argument(
        "--no-model",
        action="store_true",
        help="run without the model runtime (rules-only reviews)",
    )
    args = parser.parse_args(argv)
    for option in ("minutes", "rate", "model_every", "sample_seconds"):
        value = getattr(args, option)
        if not math.isfinite(value) or value <= 0:
            flag = "--" + option.replace("_", "-")
            parser.error(f"{flag} must be a number above 0, got {value:g}")
    if not math.isfinite(args.warm_up_minutes) or args.warm_up_minutes < 0:
        parser.error(
            "--warm-up-minutes must be a number of at least 0, got "
            f"{args.warm_up_minutes:g}"
        )
    if args.warm_up_minutes >= args.minutes:
        parser.error("--warm-up-minutes must be shorter than --minutes")
    # growth() averages EDGE_SAMPLES samples at each end of the measured
    # span. When the span contains fewer than twice that many, the two ends
    # share samples and a growing process is compared with itself. One
    # interval more covers the time that taking each sample adds.
    measured_seconds = (args.minutes - args.warm_up_minutes) * 60
    shortest = (2 * EDGE_SAMPLES + 1) * args.sample_seconds
    if measured_seconds < shortest:
        parser.error(
            f"the {measured_seconds:g} s after the warm-up contain too few "
            f"memory samples: lengthen --minutes so that at least "
            f"{shortest:g} s follow the warm-up, or lower --sample-seconds"
        )

    return args


def main() -> int:
    args = parse_arguments()
    # A soak that crashes or is interrupted then leaves the last run's
    # figures marked failed instead of passed.
    mark_figures_stale(SOAK_ID)
    figures = run(args)
    path = write_figures("soak", figures)
    print(json.dumps(figures, indent=2))
    print(f"figures written to {path}")

    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
