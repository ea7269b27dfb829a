"""The Markdown section that `make bench` writes into docs/benchmarks.md."""

import math
from dataclasses import dataclass

from bench.measure import Comparison, Figures

SECTION_HEADING = "## Scenarios against same-run baselines"
TABLE_HEADER = (
    "| scenario | requests a second | p50 | p99 | server p50 | server p99 "
    "| CPU s per 1,000 requests | failed | ratio |"
)
TABLE_ALIGNMENT = (
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)
COLUMNS = TABLE_HEADER.count("|") - 1
# Targets: the full edge's requests a second as a share of its echo
# baseline's, the open-loop p99 in ms at its rate, and the model path's
# requests a second as a share of the raw call's.
TARGET_EDGE_RATIO = 0.60
TARGET_OPEN_LOOP_P99_MS = 50.0
TARGET_MODEL_RATIO = 0.95
# Smallest change in requests a second that the scaling lines report as
# a gain or a loss: a judgement of run-to-run noise on a shared machine,
# not a measured bound.
SCALING_MIN_GAIN = 0.10

INTRO = """\
Each scenario ran in one suite started on loopback ports, with its
baseline measured in the same run. Each side was warmed up, then measured
in runs that alternate scenario and baseline ("runs" in the machine
table), so that a change in the machine's load reaches both. Measured by
`make bench` (`bench/harness.py`). The measured Envoys are rendered like
`make run`'s, on ports of their own and with their stats merged when read
(`stats_flush_on_admin`), so that a scrape right after a run includes all
of it. Clients keep connections open and send as soon as a response
returns (closed loop), except the fixed-rate run. The load generator runs
on the same cores as the suite.

- requests a second: requests that the server side counted as completed,
  over the runs' wall time: Envoy's `downstream_rq_xx` (2xx) for REST
  through an edge, the service's `grpc_server_handled_total` (OK) for
  native gRPC, through an edge or direct, because Envoy returns a failed
  gRPC call as HTTP 200. Where no
  server process counts them (direct SQL, ingest, the raw model call) the
  client's count is used instead.
- p50, p99: client round trips. Server p50 and p99: the upper bound of the
  histogram bucket that contains the quantile, from Envoy's
  `downstream_rq_time` or the service's `grpc_server_handling_seconds`.
- CPU s per 1,000 requests: the CPU seconds of the processes that serve
  the scenario, listed below the table, per 1,000 requests. Python
  services report `process_cpu_seconds_total`; Envoy, PostgreSQL (with
  every backend), the model runtime and the raw model call's process are
  read from /proc.
- ratio: the scenario's requests a second over its baseline's.
"""


@dataclass
class OpenLoopRun:
    """The fixed-rate run of the rules-only review."""

    rate: float
    figures: Figures


def _ms(value: float | None) -> str:
    if value is None:
        return "—"

    return f"{value:.1f} ms"


def _bucket(value: float | None, figures: Figures) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        finite = [bound for bound in figures.buckets if not math.isinf(bound)]
        return f"> {max(finite):g} ms" if finite else "—"

    return f"≤ {value:g} ms"


def _rate(value: float) -> str:
    if value < 10:
        return f"{value:.3g}"

    return f"{value:,.0f}"


def _cpu(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _row(title: str, figures: Figures, ratio: str) -> str:
    cells = [
        title,
        _rate(figures.requests_per_second),
        _ms(figures.client_ms(0.50)),
        _ms(figures.client_ms(0.99)),
        _bucket(figures.server_ms(0.50), figures),
        _bucket(figures.server_ms(0.99), figures),
        _cpu(figures.cpu_per_thousand),
        str(figures.client.errors),
        ratio,
    ]

    return "| " + " | ".join(cells) + " |"


def comparison_rows(comparison: Comparison) -> list[str]:
    """Return the table's two rows of a comparison: scenario, baseline."""
    if comparison.skipped:
        skipped = f"skipped: {comparison.skipped}"
        return [
            "| " + " | ".join([side.title] + [skipped] * (COLUMNS - 1)) + " |"
            for side in (comparison.measured, comparison.baseline)
        ]
    ratio = comparison.ratio

    return [
        _row(
            comparison.measured.title,
            comparison.measured_figures,
            "—" if ratio is None else f"{ratio:.2f}",
        ),
        _row(comparison.baseline.title, comparison.baseline_figures, ""),
    ]


@dataclass(frozen=True)
class Target:
    """One target of the run: its condition, the figure and the result."""

    name: str
    figure: str
    # "met", "missed", or "skipped" when the scenario did not run.
    result: str


def _met(condition: bool) -> str:
    return "met" if condition else "missed"


def _ratio_target(
    name: str, comparison: Comparison | None, minimum: float
) -> Target:
    if comparison is None or comparison.skipped:
        reason = comparison.skipped if comparison is not None else "not run"
        return Target(name, f"skipped: {reason}", "skipped")
    if comparison.ratio is None:
        return Target(
            name, "no figure: the baseline completed no request", "missed"
        )

    return Target(
        name,
        f"ratio {comparison.ratio:.2f}",
        _met(comparison.ratio >= minimum),
    )


def targets(
    comparisons: dict[str, Comparison], open_loop: OpenLoopRun
) -> list[Target]:
    """Return the run's targets, met or missed."""
    edge = _ratio_target(
        f"full edge at least {TARGET_EDGE_RATIO:.0%} of its baseline",
        comparisons.get("rest_review"),
        TARGET_EDGE_RATIO,
    )
    figures = open_loop.figures
    p99 = figures.client_ms(0.99)
    achieved = figures.requests_per_second
    # A run that fell short of its rate, or failed requests, did not meet
    # the target whatever its p99.
    met = (
        achieved >= 0.95 * open_loop.rate
        and figures.client.errors == 0
        and p99 is not None
        and p99 < TARGET_OPEN_LOOP_P99_MS
    )
    open_loop_target = Target(
        f"rules-only review p99 under {TARGET_OPEN_LOOP_P99_MS:g} ms at "
        f"{open_loop.rate:g} requests a second (open loop)",
        f"p99 {_ms(p99)} at {achieved:,.0f} requests a second, "
        f"{figures.client.errors} failed",
        _met(met),
    )
    model = _ratio_target(
        f"model path within {1 - TARGET_MODEL_RATIO:.0%} of the raw runtime",
        comparisons.get("model_review"),
        TARGET_MODEL_RATIO,
    )

    return [edge, open_loop_target, model]


def target_rows(results: list[Target]) -> list[str]:
    return [
        "| target | figure | result |",
        "| --- | --- | --- |",
        *(
            f"| {target.name} | {target.figure} | {target.result} |"
            for target in results
        ),
    ]


def cpu_notes(
    comparisons: list[Comparison], open_loop: OpenLoopRun
) -> list[str]:
    """List the processes whose CPU each row counts."""
    lines = ["CPU counted per row:", ""]
    sides = [
        (side, figures)
        for comparison in comparisons
        if not comparison.skipped
        for side, figures in (
            (comparison.measured, comparison.measured_figures),
            (comparison.baseline, comparison.baseline_figures),
        )
    ]
    for side, figures in sides:
        names = ", ".join(
            f"{name} {seconds:.2f} s"
            for name, seconds in figures.cpu_by_process.items()
        )
        lines.append(f"- {side.title}: {names}.")
    names = ", ".join(
        f"{name} {seconds:.2f} s"
        for name, seconds in open_loop.figures.cpu_by_process.items()
    )
    lines.append(f"- fixed-rate run: {names}.")

    return lines


def failure_notes(
    comparisons: list[Comparison], open_loop: OpenLoopRun
) -> list[str]:
    """Name each side with failed requests and its first error."""
    sides = [("fixed-rate run", open_loop.figures)]
    for comparison in comparisons:
        sides += [
            (comparison.measured.title, comparison.measured_figures),
            (comparison.baseline.title, comparison.baseline_figures),
        ]

    return [
        f"- {title}: {figures.client.errors} failed, the first with "
        f"{figures.client.first_error}"
        for title, figures in sides
        if figures.client.errors
    ]


def render_section(
    comparisons: list[Comparison],
    open_loop: OpenLoopRun,
    machine: list[tuple[str, str]],
) -> str:
    by_key = {comparison.key: comparison for comparison in comparisons}
    lines = [SECTION_HEADING, "", INTRO, TABLE_HEADER, TABLE_ALIGNMENT]
    for comparison in comparisons:
        lines += comparison_rows(comparison)
    results = targets(by_key, open_loop)
    lines += ["", "Targets:", "", *target_rows(results), ""]
    lines += scaling_lines(by_key, machine_value(machine, "cores"))
    lines += cpu_notes(comparisons, open_loop)
    failures = failure_notes(comparisons, open_loop)
    if failures:
        lines += ["", "Failed requests:", "", *failures]
    notes = [note for comparison in comparisons for note in comparison.notes]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in machine),
    ]

    return "\n".join(lines) + "\n"


def scaling_verdict(comparison: Comparison) -> str:
    """Say whether 2 replicas served more requests a second than 1, and
    by how much."""
    ratio = comparison.ratio
    if ratio is None:
        return "no verdict, because the 1-replica side completed no request"
    change = ratio - 1
    if change >= SCALING_MIN_GAIN:
        return f"scaled: {change:.0%} more requests a second"
    if change <= -SCALING_MIN_GAIN:
        return f"did not scale: {-change:.0%} fewer requests a second"

    return (
        f"did not scale: {change:+.0%}, within the {SCALING_MIN_GAIN:.0%} "
        "that the report counts as noise"
    )


def scaling_lines(by_key: dict[str, Comparison], cores: str) -> list[str]:
    """Return the verdict of each replica comparison that ran."""
    configurations = (
        (
            "scaling",
            "cds and auth at 2 replicas each behind the edge (REST review, "
            "with Envoy, PostgreSQL and the client on the same cores)",
        ),
        (
            "cds_scaling",
            "the CDS service called directly at 2 replicas (native gRPC, "
            "calls spread round-robin by the client)",
        ),
    )
    items = []
    for key, label in configurations:
        comparison = by_key.get(key)
        if comparison is None or comparison.skipped:
            continue
        measured = comparison.measured_figures.requests_per_second
        baseline = comparison.baseline_figures.requests_per_second
        items.append(
            f"- {label}: {measured:,.0f} requests a second against "
            f"{baseline:,.0f} at 1 replica; "
            f"{scaling_verdict(comparison)}."
        )
    if not items:
        return []

    return [f"Scaling past one process on {cores}:", "", *items, ""]


def machine_value(machine: list[tuple[str, str]], name: str) -> str:
    return dict(machine).get(name, "")
