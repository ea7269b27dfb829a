"""Server-side figures of one `make bench` run, and runs of a scenario
against its baseline.

Request counts and latency histograms come from the Prometheus endpoints
of the services and of Envoy's stats listener, scraped before and after
each run. CPU time comes from each Python service's
`process_cpu_seconds_total`, and from /proc for Envoy, PostgreSQL and the
model runtime, which serve no CPU metric. Client timing gives p50 and
p99 of the round trips.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    percentile,
    process_cpu_seconds,
    process_tree_cpu_seconds,
)
from bench.load import LoadResult
from tests.e2e.fault_load import sample_sum, scrape

# Seconds between the last response and the scrape after a run: Envoy
# counts a request once the response has left, which the client may see
# first.
SETTLE_SECONDS = 0.3
# Seconds Envoy gets to merge its histograms between two reads of its
# stats: the merge itself takes milliseconds.
MERGE_SECONDS = 0.2


@dataclass(frozen=True)
class Counter:
    """A server-side count of completed requests: a Prometheus counter."""

    port: int
    name: str
    labels: tuple[tuple[str, str], ...]

    def read(self, scrapes: dict[int, dict]) -> float:
        return sample_sum(scrapes[self.port], self.name, **dict(self.labels))


@dataclass(frozen=True)
class Histogram:
    """A Prometheus latency histogram, by its name without `_bucket`."""

    port: int
    name: str
    labels: tuple[tuple[str, str], ...]
    # Milliseconds per unit of the bucket bounds: 1000 for seconds, 1 for
    # Envoy's histograms, which are in milliseconds.
    unit_ms: float
    # True for Envoy, whose stats endpoint starts merging its worker
    # threads' histograms when it is read and returns the last merge, so
    # an up-to-date figure takes a second read.
    merged_on_read: bool = False

    def read(self, scrapes: dict[int, dict]) -> dict[float, float]:
        """Return the cumulative count of each bucket, by upper bound."""
        wanted = set(self.labels)
        buckets: dict[float, float] = {}
        for (name, labels), value in scrapes[self.port].items():
            if name != f"{self.name}_bucket" or not wanted <= labels:
                continue
            bound = float(dict(labels)["le"]) * self.unit_ms
            buckets[bound] = buckets.get(bound, 0.0) + value

        return buckets


@dataclass(frozen=True)
class CpuSource:
    """One process whose CPU time a run counts.

    `kind` is "metrics" (a Python service's metrics port), "process" (a
    pid, read from /proc), "tree" (a pid and every child it started, for
    PostgreSQL) or "self" (this process, for work the harness itself
    does).
    """

    name: str
    kind: str
    port_or_pid: int = 0

    def read(self, scrapes: dict[int, dict]) -> float:
        if self.kind == "metrics":
            return sample_sum(
                scrapes[self.port_or_pid], "process_cpu_seconds_total"
            )
        if self.kind == "process":
            return process_cpu_seconds(self.port_or_pid)
        if self.kind == "tree":
            return process_tree_cpu_seconds(self.port_or_pid)
        if self.kind == "self":
            return time.process_time()
        raise ValueError(
            f"CPU source {self.name!r} has the unknown kind {self.kind!r}: "
            "expected metrics, process, tree or self"
        )


@dataclass
class Side:
    """One thing measured: a scenario, or the baseline it is compared to.

    `load(seconds)` sends requests for about that long. `count` is None
    where no server process counts the requests (a direct SQL query, a
    call into a library), and the client's count is used instead.
    """

    title: str
    load: Callable[[float], LoadResult]
    cpu: list[CpuSource]
    count: Counter | None = None
    latency: Histogram | None = None
    # Called with the run's seconds before the measured window opens, for
    # work such as writing an input file that the CPU figures must leave
    # out.
    prepare: Callable[[float], None] | None = None


@dataclass
class Figures:
    """Client and server figures of one side, added up over its runs."""

    client: LoadResult = field(default_factory=LoadResult)
    server_requests: float = 0.0
    cpu_seconds: float = 0.0
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    # Requests per histogram bucket, cumulative, by upper bound in ms.
    buckets: dict[float, float] = field(default_factory=dict)
    counted_by: str = "server"

    @property
    def requests(self) -> float:
        return self.server_requests

    @property
    def requests_per_second(self) -> float:
        if self.client.seconds <= 0:
            return 0.0

        return self.requests / self.client.seconds

    def client_ms(self, fraction: float) -> float | None:
        if not self.client.latencies_ms:
            return None

        return percentile(sorted(self.client.latencies_ms), fraction)

    def server_ms(self, fraction: float) -> float | None:
        """Return the upper bound of the bucket that contains the quantile,
        math.inf past the last bound, or None without a histogram."""
        if not self.buckets:
            return None
        total = self.buckets.get(math.inf, max(self.buckets.values()))
        if total <= 0:
            return None
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= fraction * total:
                return bound

        return math.inf

    @property
    def cpu_per_thousand(self) -> float | None:
        if self.requests <= 0:
            return None

        return self.cpu_seconds / self.requests * 1000


def _scrape_all(side: Side) -> dict[int, dict]:
    ports = {s.port_or_pid for s in side.cpu if s.kind == "metrics"}
    for metric in (side.count, side.latency):
        if metric is not None:
            ports.add(metric.port)
    if side.latency is not None and side.latency.merged_on_read:
        scrape(side.latency.port)
        time.sleep(MERGE_SECONDS)

    return {port: scrape(port) for port in ports}


def measure(side: Side, seconds: float, figures: Figures) -> None:
    """Run one side's load for `seconds` and add its figures."""
    if side.prepare is not None:
        side.prepare(seconds)
    before = _scrape_all(side)
    cpu_before = {source.name: source.read(before) for source in side.cpu}
    count_before = side.count.read(before) if side.count else 0.0
    buckets_before = side.latency.read(before) if side.latency else {}

    result = side.load(seconds)

    time.sleep(SETTLE_SECONDS)
    after = _scrape_all(side)
    figures.client.add(result)
    for source in side.cpu:
        used = source.read(after) - cpu_before[source.name]
        figures.cpu_by_process[source.name] = (
            figures.cpu_by_process.get(source.name, 0.0) + used
        )
        figures.cpu_seconds += used
    if side.count is None:
        figures.server_requests += result.requests
        figures.counted_by = "client"
    else:
        figures.server_requests += side.count.read(after) - count_before
    if side.latency is not None:
        for bound, count in side.latency.read(after).items():
            figures.buckets[bound] = (
                figures.buckets.get(bound, 0.0)
                + count
                - buckets_before.get(bound, 0.0)
            )


@dataclass
class Comparison:
    """A scenario and its baseline, measured in the same run."""

    key: str
    measured: Side
    baseline: Side
    measured_figures: Figures = field(default_factory=Figures)
    baseline_figures: Figures = field(default_factory=Figures)
    # Why the pair was not measured, when it was not.
    skipped: str = ""
    # Facts about the run that the report prints below the table.
    notes: list[str] = field(default_factory=list)
    # Called once both sides ran; returns a note for the report, if any.
    finish: Callable[[], str | None] | None = None
    # Processes and settings of the run that figures.json records beside
    # the figures, such as the pids and settings of both model paths.
    facts: dict[str, Any] = field(default_factory=dict)
    # Stops the processes that the scenario started for itself. The
    # harness calls it once the scenario ran or failed.
    stop: Callable[[], None] | None = None

    @property
    def ratio(self) -> float | None:
        """The scenario's requests a second over its baseline's."""
        baseline = self.baseline_figures.requests_per_second
        if baseline <= 0:
            return None

        return self.measured_figures.requests_per_second / baseline


def compare(
    comparison: Comparison,
    seconds: float,
    warmup_seconds: float,
    rounds: int = 2,
) -> None:
    """Measure a scenario and its baseline in alternating runs.

    Each side first gets an untimed warm-up unless `warmup_seconds` is 0,
    then `rounds` runs of seconds / rounds each, scenario and baseline in
    turn, so that a change in the machine's load during the comparison
    reaches both.
    """
    sides = [
        (comparison.measured, comparison.measured_figures),
        (comparison.baseline, comparison.baseline_figures),
    ]
    if warmup_seconds > 0:
        for side, _ in sides:
            side.load(warmup_seconds)
    for _ in range(rounds):
        for side, figures in sides:
            measure(side, seconds / rounds, figures)
    if comparison.finish is not None:
        note = comparison.finish()
        if note:
            comparison.notes.append(note)
