"""Convert request fields of type Timestamp and Duration, checking ranges.

The JSON transcoder rejects out-of-range values in REST requests, but a
native gRPC client can send any 64-bit seconds and 32-bit nanos. Protobuf's
own `ToDatetime` and `ToTimedelta` then raise ValueError or OverflowError,
which a servicer would turn into INTERNAL. These functions raise ValueError
with a message that fits a `FieldViolation` description instead.
"""

import datetime

from google.protobuf import duration_pb2, timestamp_pb2

# The range google/protobuf/timestamp.proto documents:
# 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# The range google/protobuf/duration.proto documents: about 10,000 years
# either way.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999


def to_datetime(stamp: timestamp_pb2.Timestamp) -> datetime.datetime:
    """Return a Timestamp as an aware UTC datetime.

    Raises ValueError when `seconds` or `nanos` is outside the range that
    google.protobuf.Timestamp allows.
    """
    if not MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS:
        raise ValueError(
            "must be from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z "
            f"(seconds {MIN_TIMESTAMP_SECONDS} to {MAX_TIMESTAMP_SECONDS})"
        )
    if not 0 <= stamp.nanos <= MAX_NANOS:
        raise ValueError(f"nanos must be 0 to {MAX_NANOS}, got {stamp.nanos}")

    return stamp.ToDatetime(datetime.UTC)


def to_timedelta(duration: duration_pb2.Duration) -> datetime.timedelta:
    """Return a Duration as a timedelta.

    Raises ValueError when `seconds` or `nanos` is outside the range that
    google.protobuf.Duration allows, or when the two have opposite signs.
    """
    if not -MAX_DURATION_SECONDS <= duration.seconds <= MAX_DURATION_SECONDS:
        raise ValueError(
            f"seconds must be {-MAX_DURATION_SECONDS} to "
            f"{MAX_DURATION_SECONDS}"
        )
    if not -MAX_NANOS <= duration.nanos <= MAX_NANOS:
        raise ValueError(
            f"nanos must be {-MAX_NANOS} to {MAX_NANOS}, got {duration.nanos}"
        )
    if duration.seconds * duration.nanos < 0:
        raise ValueError("seconds and nanos must have the same sign")

    return duration.ToTimedelta()
