"""Percentiles of the fault tests' latencies use the nearest rank."""

from tests.e2e.fault_load import percentile


def test_median_of_five_is_third():
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], 0.5) == 3.0


def test_p99_of_150_is_149th():
    values = [float(rank) for rank in range(1, 151)]
    assert percentile(values, 0.99) == 149.0


def test_percentile_of_nothing_is_zero():
    assert percentile([], 0.99) == 0.0
