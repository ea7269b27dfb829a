"""Arithmetic of the bench figures on synthetic samples and scrapes."""

import math
import time

import prometheus_client
import pytest

from bench.common import percentile
from bench.load import LoadResult
from bench.measure import (
    Comparison,
    Counter,
    CpuSource,
    Figures,
    Histogram,
    Side,
    measure,
)


def figures(requests: float, seconds: float) -> Figures:
    result = Figures(client=LoadResult(seconds=seconds))
    result.server_requests = requests

    return result


def idle(seconds: float) -> LoadResult:
    return LoadResult(requests=1, latencies_ms=[1.0], seconds=seconds)


def comparison(measured: Figures, baseline: Figures) -> Comparison:
    side = Side("unused", idle, cpu=[])

    return Comparison("example", side, side, measured, baseline)


def test_percentile_nearest_rank():
    values = [float(value) for value in range(1, 101)]

    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_percentile_rounds_rank_up():
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


def test_requests_per_second():
    assert figures(1500, 3.0).requests_per_second == 500.0
    assert figures(1500, 0.0).requests_per_second == 0.0


def test_ratio_measured_over_baseline():
    result = comparison(figures(600, 2.0), figures(1200, 2.0))

    assert result.ratio == pytest.approx(0.5)


def test_ratio_without_baseline_requests():
    assert comparison(figures(600, 2.0), figures(0, 0.0)).ratio is None


def test_cpu_per_thousand():
    result = figures(2000, 4.0)
    result.cpu_seconds = 3.0

    assert result.cpu_per_thousand == pytest.approx(1.5)
    assert figures(0, 4.0).cpu_per_thousand is None


def test_client_percentiles_sort_latencies():
    result = Figures(client=LoadResult(latencies_ms=[9.0, 1.0, 5.0, 3.0]))

    assert result.client_ms(0.5) == 3.0
    assert result.client_ms(0.99) == 9.0
    assert Figures().client_ms(0.5) is None


def test_server_ms_from_buckets():
    result = Figures(buckets={1.0: 10, 5.0: 60, 25.0: 99, math.inf: 100})

    assert result.server_ms(0.1) == 1.0
    assert result.server_ms(0.5) == 5.0
    assert result.server_ms(0.99) == 25.0
    assert result.server_ms(1.0) == math.inf


def test_server_ms_without_histogram():
    assert Figures().server_ms(0.5) is None
    assert Figures(buckets={1.0: 0, math.inf: 0}).server_ms(0.5) is None


@pytest.fixture
def metrics():
    """Serve a registry of its own on a free loopback port."""
    registry = prometheus_client.CollectorRegistry()
    server, thread = prometheus_client.start_http_server(
        0, addr="127.0.0.1", registry=registry
    )
    try:
        yield registry, server.server_port
    finally:
        server.shutdown()
        thread.join(5)


def test_measure_takes_scrape_deltas(metrics):
    registry, port = metrics
    handled = prometheus_client.Counter(
        "handled", "Calls.", ["code"], registry=registry
    )
    seconds = prometheus_client.Histogram(
        "handling_seconds", "Seconds.", buckets=(0.01, 0.1), registry=registry
    )
    # Figures from before the run must not count.
    handled.labels("OK").inc(50)
    seconds.observe(0.5)

    def load(run_seconds: float) -> LoadResult:
        handled.labels("OK").inc(7)
        handled.labels("UNAVAILABLE").inc(3)
        for value in (0.005, 0.005, 0.05):
            seconds.observe(value)

        return LoadResult(requests=10, seconds=run_seconds)

    side = Side(
        "synthetic",
        load,
        cpu=[],
        count=Counter(port, "handled_total", (("code", "OK"),)),
        latency=Histogram(port, "handling_seconds", (), unit_ms=1000.0),
    )
    result = Figures()

    measure(side, 2.0, result)

    assert result.server_requests == 7.0
    assert result.counted_by == "server"
    assert result.requests_per_second == pytest.approx(3.5)
    assert result.buckets == {10.0: 2.0, 100.0: 3.0, math.inf: 3.0}
    assert result.server_ms(0.5) == 10.0
    assert result.server_ms(0.99) == 100.0


def test_measure_counts_client_without_counter():
    side = Side("synthetic", idle, cpu=[])
    result = Figures()

    measure(side, 0.5, result)
    measure(side, 0.5, result)

    assert result.server_requests == 2.0
    assert result.counted_by == "client"
    assert result.client.seconds == pytest.approx(1.0)


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_measure_leaves_out_prepare_cpu():
    side = Side(
        "synthetic",
        idle,
        cpu=[CpuSource("harness", "self")],
        prepare=burn_cpu,
    )
    result = Figures()

    measure(side, 0.3, result)

    assert result.cpu_seconds < 0.1
    assert result.cpu_by_process["harness"] == result.cpu_seconds


def test_measure_counts_load_cpu():
    def busy(seconds: float) -> LoadResult:
        burn_cpu(seconds)

        return idle(seconds)

    side = Side("synthetic", busy, cpu=[CpuSource("harness", "self")])
    result = Figures()

    measure(side, 0.3, result)

    assert result.cpu_seconds >= 0.25
