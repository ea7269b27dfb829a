"""The retention job's date arithmetic and verification windows."""

import datetime

import pytest

from services.audit import retention

UTC = datetime.UTC


@pytest.mark.parametrize(
    ("now", "months", "cutoff"),
    [
        (datetime.datetime(2026, 12, 4, 16, 0), 12, (2025, 12, 1)),
        (datetime.datetime(2026, 12, 31, 23, 59), 1, (2026, 11, 1)),
        (datetime.datetime(2027, 1, 1, 0, 0), 12, (2026, 1, 1)),
        (datetime.datetime(2027, 1, 15), 13, (2025, 12, 1)),
        (datetime.datetime(2027, 3, 1), 26, (2025, 1, 1)),
    ],
)
def test_cutoff_keeps_whole_months(now, months, cutoff):
    result = retention.retention_cutoff(now.replace(tzinfo=UTC), months)

    assert datetime.datetime(*cutoff, tzinfo=UTC) == result


def test_cutoff_uses_utc_month():
    """01:00 on 1 January in UTC+2 is still December in UTC."""
    now = datetime.datetime(
        2027, 1, 1, 1, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )

    assert datetime.datetime(
        2025, 12, 1, tzinfo=UTC
    ) == retention.retention_cutoff(now, 12)


def test_partition_bounds_with_offsets():
    """PostgreSQL renders bounds in the session's time zone."""
    bounds = retention.partition_bounds(
        "FOR VALUES FROM ('2024-02-29 19:00:00-05')"
        " TO ('2024-03-31 20:00:00-04')"
    )

    assert (
        datetime.datetime(2024, 3, 1, tzinfo=UTC),
        datetime.datetime(2024, 4, 1, tzinfo=UTC),
    ) == bounds


@pytest.mark.parametrize(
    "bound",
    [
        "DEFAULT",
        "FOR VALUES FROM (MINVALUE) TO ('2024-01-01 00:00:00+00')",
        "FOR VALUES IN ('a')",
    ],
)
def test_partition_bounds_other_kinds(bound):
    assert retention.partition_bounds(bound) is None


class TestVerificationWindows:
    def test_one_window_without_checkpoints(self):
        assert [(0, 9)] == retention.verification_windows(0, [], 9)

    def test_windows_start_at_previous_cut(self):
        assert [(40, 90)] == retention.verification_windows(40, [40, 90], 90)

    def test_windows_split_at_checkpoints(self):
        windows = retention.verification_windows(
            0, [3, 10, 12, 25, 30], 30, size=10
        )

        assert [(0, 10), (10, 25), (25, 30)] == windows

    def test_checkpoints_outside_range_ignored(self):
        windows = retention.verification_windows(
            10, [5, 10, 40, 80], 50, size=10
        )

        assert [(10, 40), (40, 50)] == windows

    def test_windows_cover_every_seq_once(self):
        windows = retention.verification_windows(
            7, list(range(8, 1000, 13)), 999, size=50
        )

        covered = [seq for start, end in windows for seq in range(start, end)]
        assert list(range(7, 999)) == covered
