"""The report's verdict on scaling from 1 to 2 replicas."""

from bench.load import LoadResult
from bench.measure import Comparison, Figures, Side
from bench.report import scaling_lines, scaling_verdict


def figures(requests: float) -> Figures:
    result = Figures(client=LoadResult(seconds=10.0))
    result.server_requests = requests

    return result


def comparison(
    key: str, two_replicas: float, one_replica: float
) -> Comparison:
    """Return a pair whose sides served these requests in 10 seconds."""
    side = Side("unused", lambda seconds: LoadResult(), cpu=[])

    return Comparison(
        key, side, side, figures(two_replicas), figures(one_replica)
    )


def test_verdict_scaled():
    verdict = scaling_verdict(comparison("cds_scaling", 15_000, 10_000))

    assert verdict == "scaled: 50% more requests a second"


def test_verdict_slower():
    # The figures that docs/benchmarks.md recorded: 619 against 704.
    verdict = scaling_verdict(comparison("scaling", 6_190, 7_040))

    assert verdict == "did not scale: 12% fewer requests a second"


def test_verdict_within_noise():
    verdict = scaling_verdict(comparison("scaling", 10_300, 10_000))

    assert verdict.startswith("did not scale: +3%")


def test_verdict_without_baseline():
    verdict = scaling_verdict(comparison("scaling", 10_000, 0))

    assert verdict.startswith("no verdict")


def test_scaling_lines_each_configuration():
    by_key = {
        "scaling": comparison("scaling", 6_190, 7_040),
        "cds_scaling": comparison("cds_scaling", 15_000, 10_000),
    }

    lines = scaling_lines(by_key, "2 CPUs")

    assert lines[0] == "Scaling past one process on 2 CPUs:"
    assert "619 requests a second against 704" in lines[2]
    assert lines[2].endswith("did not scale: 12% fewer requests a second.")
    assert "CDS service called directly" in lines[3]
    assert lines[3].endswith("scaled: 50% more requests a second.")


def test_scaling_lines_skip_missing():
    skipped = comparison("cds_scaling", 0, 0)
    skipped.skipped = "not run"

    assert scaling_lines({"cds_scaling": skipped}, "2 CPUs") == []
