"""Hooks for the end-to-end tests."""

import pytest

from tests.e2e.fault_load import mark_figures_stale, record_test_result


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Store each fault test's result in the figures it wrote."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        record_test_result(report.passed)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Mark the figures of this test's earlier run as not passed until it
    passes again."""
    mark_figures_stale(item.nodeid)
