"""Range checks of request Timestamp and Duration fields."""

import datetime

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from services.common import time_fields


class TestToDatetime:
    @pytest.mark.parametrize(
        ("seconds", "nanos", "expected"),
        [
            (0, 0, datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)),
            (
                time_fields.MIN_TIMESTAMP_SECONDS,
                0,
                datetime.datetime(1, 1, 1, tzinfo=datetime.UTC),
            ),
            (
                time_fields.MAX_TIMESTAMP_SECONDS,
                time_fields.MAX_NANOS,
                datetime.datetime(
                    9999, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC
                ),
            ),
        ],
    )
    def test_range_limits_accepted(self, seconds, nanos, expected):
        stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)

        assert expected == time_fields.to_datetime(stamp)

    @pytest.mark.parametrize(
        ("seconds", "nanos", "words"),
        [
            (2**62, 0, "9999-12-31T23:59:59Z"),
            (time_fields.MAX_TIMESTAMP_SECONDS + 1, 0, "9999-12-31T23:59:59Z"),
            (time_fields.MIN_TIMESTAMP_SECONDS - 1, 0, "0001-01-01T00:00:00Z"),
            (0, -5, "nanos must be 0 to 999999999, got -5"),
            (0, 10**9, "nanos must be 0 to 999999999"),
        ],
    )
    def test_out_of_range_rejected(self, seconds, nanos, words):
        stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)

        with pytest.raises(ValueError) as raised:
            time_fields.to_datetime(stamp)

        assert words in str(raised.value)


class TestToTimedelta:
    @pytest.mark.parametrize(
        ("seconds", "nanos", "expected"),
        [
            (0, 0, datetime.timedelta(0)),
            (90, 500_000_000, datetime.timedelta(seconds=90.5)),
            (-1, -500_000_000, datetime.timedelta(seconds=-1.5)),
            (
                time_fields.MAX_DURATION_SECONDS,
                0,
                datetime.timedelta(seconds=time_fields.MAX_DURATION_SECONDS),
            ),
        ],
    )
    def test_valid_durations_converted(self, seconds, nanos, expected):
        duration = duration_pb2.Duration(seconds=seconds, nanos=nanos)

        assert expected == time_fields.to_timedelta(duration)

    @pytest.mark.parametrize(
        ("seconds", "nanos", "words"),
        [
            (2**62, 0, "seconds must be"),
            (-(2**62), 0, "seconds must be"),
            (time_fields.MAX_DURATION_SECONDS + 1, 0, "seconds must be"),
            (0, 10**9, "nanos must be"),
            (60, -1, "same sign"),
            (-60, 1, "same sign"),
        ],
    )
    def test_out_of_range_rejected(self, seconds, nanos, words):
        duration = duration_pb2.Duration(seconds=seconds, nanos=nanos)

        with pytest.raises(ValueError) as raised:
            time_fields.to_timedelta(duration)

        assert words in str(raised.value)
