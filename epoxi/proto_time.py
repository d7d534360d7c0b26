"""Seconds (``time.time()`` floats) to and from protobuf's Duration and Timestamp, to the nanosecond."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(round(seconds * 1e9))
    return t
