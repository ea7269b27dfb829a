"""Time the deterministic screening of a large review on one core.

Each review has 50 medications, 50 conditions and 50 allergies, all named
from the knowledge base. Two reviews are timed: a typical one, whose
medications are spread evenly over the vocabulary, and a worst case,
whose medications are the drugs that the most rules name, so that as
many rules as possible fire. Only `screen` is timed: no request parsing,
no gRPC and no model review. The process is pinned to one CPU with
os.sched_setaffinity.

    .venv/bin/python bench/screening.py [--iterations N] [--cpu N]
        [--profile] [--no-write] [--gc-freeze] [--check]

The script prints p50 and p99 in milliseconds, of wall time and of CPU
time, with the machine it ran on and writes them into the "Screening"
section of docs/benchmarks.md.
"""

import argparse
import cProfile
import datetime
import gc
import itertools
import os
import platform
import pstats
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from arxio.cds.v1 import cds_pb2

# Run as a script from any folder: the shared helpers live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BENCHMARKS_DOC,
    cpu_model,
    percentile,
    write_section,
)
from services.cds.knowledge_base import (  # noqa: E402
    KnowledgeBase,
    load_knowledge_base,
)
from services.cds.screening import screen  # noqa: E402

REVIEW_SIZE = 50
TARGET_P99_MS = 5.0
SECTION_HEADING = "## Screening"


def _rule_counts(kb: KnowledgeBase) -> Counter:
    """Count the rules that name each drug, over every module."""
    counts: Counter = Counter()
    drug_sets = [
        *(r.object_drugs | r.precipitant_drugs for r in kb.interactions),
        *(r.members for r in kb.allergy_classes),
        *(r.members for r in kb.cross_reactivities),
        *(r.drugs for r in kb.condition_rules),
        *(r.drugs for r in kb.age_rules),
        *(r.drugs for r in kb.pregnancy_rules),
        *(r.drugs for r in kb.lactation_rules),
        *(r.drugs for r in kb.renal_rules),
        *(r.members for r in kb.duplicate_rules),
        *({limit.drug} for limit in kb.dose_limits),
    ]
    for drugs in drug_sets:
        counts.update(drugs)

    return counts


def _medication(kb: KnowledgeBase, drug_id: str) -> cds_pb2.Medication:
    """Order a drug in two doses a day that add up to its daily maximum.

    The dose check then reads the unit, route and frequency and compares
    the totals, as it does for a real order. Drugs without a dose limit
    get 10 mg twice daily.
    """
    limits = [limit for limit in kb.dose_limits if limit.drug == drug_id]
    if not limits:
        return cds_pb2.Medication(
            name=kb.drugs[drug_id].name,
            dose=cds_pb2.Dose(value=10, unit="mg"),
            route="oral",
            frequency="twice daily",
        )
    limit = limits[0]

    return cds_pb2.Medication(
        name=kb.drugs[drug_id].name,
        dose=cds_pb2.Dose(
            value=limit.max_daily.value / 2, unit=limit.max_daily.unit
        ),
        route=limit.routes[0] if limit.routes else "",
        frequency="every 12 hours",
    )


def select_drugs(kb: KnowledgeBase, worst_case: bool) -> list[str]:
    """Return 50 drug ids, then the rest of the vocabulary.

    The typical selection takes every n-th drug by name, the worst case
    the drugs that the most rules name.
    """
    by_name = sorted(kb.drugs, key=lambda d: kb.drugs[d].name.casefold())
    if worst_case:
        counts = _rule_counts(kb)

        return sorted(by_name, key=lambda d: -counts[d])
    step = max(1, len(by_name) // REVIEW_SIZE)
    chosen = by_name[::step][:REVIEW_SIZE]
    chosen_ids = set(chosen)

    return chosen + [d for d in by_name if d not in chosen_ids]


def build_review(
    kb: KnowledgeBase, drug_ids: list[str]
) -> cds_pb2.ClinicalReviewRequest:
    """Build a benchmark review of the first 50 of `drug_ids`.

    Conditions are each condition's name with its first ICD-10 prefix,
    then its other terms. Allergies are each allergy class by name, then
    drugs that are not among the medications. A knowledge base with fewer
    than 50 condition names and terms repeats them, which repeats their
    findings, so the figure is then an overestimate.
    """
    medications = [_medication(kb, d) for d in drug_ids[:REVIEW_SIZE]]

    condition_items = []
    for condition in sorted(kb.conditions.values(), key=lambda c: c.id):
        code = condition.icd10_prefixes[0] if condition.icd10_prefixes else ""
        condition_items.append(
            cds_pb2.Condition(name=condition.name, icd10=code)
        )
        condition_items += [
            cds_pb2.Condition(name=term) for term in condition.terms
        ]
    conditions = list(
        itertools.islice(itertools.cycle(condition_items), REVIEW_SIZE)
    )

    substances = [allergy_class.name for allergy_class in kb.allergy_classes]
    substances += [kb.drugs[d].name for d in drug_ids[REVIEW_SIZE:]]
    allergies = [
        cds_pb2.Allergy(
            substance=substance,
            severity=cds_pb2.Allergy.Severity.MODERATE,
        )
        for substance in substances[:REVIEW_SIZE]
    ]

    return cds_pb2.ClinicalReviewRequest(
        patient=cds_pb2.Patient(
            age_years=70,
            sex=cds_pb2.Patient.Sex.FEMALE,
            weight_kg=60,
            egfr=25,
        ),
        medications=medications,
        conditions=conditions,
        allergies=allergies,
    )


def pin_to_cpu(cpu: int | None) -> int:
    """Pin this process to one CPU, by default the first it may use."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[0] if cpu is None else cpu
    if chosen not in allowed:
        raise SystemExit(
            f"CPU {chosen} is not available to this process; choose one "
            f"of {allowed} with --cpu"
        )
    os.sched_setaffinity(0, {chosen})

    return chosen


@dataclass(frozen=True)
class Timings:
    """Per-screening times in milliseconds, each list sorted."""

    wall_ms: list[float]
    # CPU time of this thread, which excludes time spent waiting for the
    # core while other processes run on it.
    cpu_ms: list[float]
    full_collections: int


def time_screening(
    request: cds_pb2.ClinicalReviewRequest,
    kb: KnowledgeBase,
    iterations: int,
    warmup: int,
) -> Timings:
    """Time the screenings and count the full garbage collections.

    A full collection traverses every object of the process and pauses
    the screening that triggered it, so a few of them can set the p99.
    """
    for _ in range(warmup):
        screen(request, kb)
    full_collections = 0

    def count_full_collections(phase: str, info: dict) -> None:
        nonlocal full_collections
        if phase == "start" and info["generation"] == 2:
            full_collections += 1

    wall_ms = []
    cpu_ms = []
    gc.callbacks.append(count_full_collections)
    try:
        for _ in range(iterations):
            cpu_start = time.thread_time_ns()
            start = time.perf_counter_ns()
            screen(request, kb)
            wall_ms.append((time.perf_counter_ns() - start) / 1e6)
            cpu_ms.append((time.thread_time_ns() - cpu_start) / 1e6)
    finally:
        gc.callbacks.remove(count_full_collections)

    return Timings(sorted(wall_ms), sorted(cpu_ms), full_collections)


@dataclass(frozen=True)
class Measurement:
    review: str
    p50_ms: float
    p99_ms: float
    cpu_p50_ms: float
    cpu_p99_ms: float
    findings: int
    distinct_conditions: int
    distinct_allergies: int
    full_collections: int


def measure(
    review: str,
    request: cds_pb2.ClinicalReviewRequest,
    kb: KnowledgeBase,
    iterations: int,
    warmup: int,
) -> Measurement:
    timings = time_screening(request, kb, iterations, warmup)

    return Measurement(
        review=review,
        p50_ms=percentile(timings.wall_ms, 0.50),
        p99_ms=percentile(timings.wall_ms, 0.99),
        cpu_p50_ms=percentile(timings.cpu_ms, 0.50),
        cpu_p99_ms=percentile(timings.cpu_ms, 0.99),
        findings=len(screen(request, kb).findings),
        distinct_conditions=len({c.name for c in request.conditions}),
        distinct_allergies=len({a.substance for a in request.allergies}),
        full_collections=timings.full_collections,
    )


def render_section(
    measurements: list[Measurement], machine: list[tuple[str, str]]
) -> str:
    lines = [
        SECTION_HEADING,
        "",
        "Deterministic screening of one review with 50 medications, 50 "
        "conditions and 50 allergies named from the knowledge base, with "
        "no model review. The typical review spreads its medications over "
        "the vocabulary. The worst case takes the drugs that the most "
        "rules name. Measured by `bench/screening.py` "
        "(`make bench-screening`), which times only the `screen` call on "
        f"one pinned core. The target is a p99 of at most "
        f"{TARGET_P99_MS:g} ms of wall time. The CPU columns give the "
        "thread's CPU time, which leaves out the time the core ran other "
        "processes, so they vary less with the machine's load. Full GC "
        "runs counts the full garbage collections during the timed "
        "screenings. Each pauses one screening for a traversal of every "
        "object of the process.",
        "",
        "| Review | p50 | p99 | Target met | CPU p50 | CPU p99 | Findings "
        "| Distinct conditions | Distinct allergies | Full GC runs |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for m in measurements:
        met = "yes" if m.p99_ms <= TARGET_P99_MS else "no"
        lines.append(
            f"| {m.review} | {m.p50_ms:.2f} ms | {m.p99_ms:.2f} ms | {met} "
            f"| {m.cpu_p50_ms:.2f} ms | {m.cpu_p99_ms:.2f} ms "
            f"| {m.findings} | {m.distinct_conditions} | "
            f"{m.distinct_allergies} | {m.full_collections} |"
        )
    lines += ["", "| Machine | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in machine]

    return "\n".join(lines) + "\n"


def profile(
    request: cds_pb2.ClinicalReviewRequest, kb: KnowledgeBase, runs: int
) -> None:
    """Print the functions that cost the most over `runs` screenings."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        screen(request, kb)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iterations",
        type=int,
        default=2000,
        help="timed screenings (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="untimed screenings before timing (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        help="CPU to pin to (default: the first this process may use)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of the screenings, by own time",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help=f"do not update {BENCHMARKS_DOC.name}",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="call gc.freeze() after loading the knowledge base, so full "
        "garbage collections skip every object that exists by then",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when a review's p99 is above {TARGET_P99_MS:g} ms",
    )
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be at least 1, --warmup at least 0")

    cpu = pin_to_cpu(args.cpu)
    # Other processes on the pinned core inflate p99, so the report gives
    # the load the machine carried when the run started.
    load_at_start = os.getloadavg()[0]
    kb = load_knowledge_base()
    if args.gc_freeze:
        gc.freeze()
    reviews = {
        name: build_review(kb, select_drugs(kb, worst_case))
        for name, worst_case in (("typical", False), ("worst case", True))
    }
    measurements = [
        measure(name, request, kb, args.iterations, args.warmup)
        for name, request in reviews.items()
    ]
    machine = [
        ("CPU", f"{cpu_model()}, pinned to CPU {cpu} of {os.cpu_count()}"),
        (
            "Python",
            f"{platform.python_implementation()} {platform.python_version()}",
        ),
        ("OS", platform.platform()),
        (
            "load average at start",
            f"{load_at_start:.2f} over 1 minute, {os.cpu_count()} CPUs",
        ),
        (
            "garbage collector",
            "objects frozen after loading (gc.freeze)"
            if args.gc_freeze
            else "default settings",
        ),
        ("knowledge base", kb.version),
        ("timed screenings", f"{args.iterations} after {args.warmup} warm-up"),
        ("date", datetime.date.today().isoformat()),
    ]

    for m in measurements:
        print(
            f"{m.review}: p50 {m.p50_ms:.3f} ms, p99 {m.p99_ms:.3f} ms, "
            f"CPU p50 {m.cpu_p50_ms:.3f} ms, CPU p99 {m.cpu_p99_ms:.3f} ms, "
            f"{m.findings} findings, {m.full_collections} full garbage "
            "collections"
        )
    for name, value in machine:
        print(f"{name}: {value}")
    if not args.no_write:
        write_section(SECTION_HEADING, render_section(measurements, machine))
        print(f"wrote the {SECTION_HEADING!r} section of {BENCHMARKS_DOC}")
    if args.profile:
        for name, request in reviews.items():
            print(f"\nProfile of the {name} review:")
            profile(request, kb, min(args.iterations, 500))

    over = [m for m in measurements if m.p99_ms > TARGET_P99_MS]

    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
