"""Durations as Go writes them, and the seconds a setting takes."""

from __future__ import annotations

import pytest

from epoxi import durations
from epoxi.durations import HOUR, MICROSECOND, MILLISECOND, MINUTE, SECOND


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("0", 0),
        ("5s", 5 * SECOND),
        ("-1.5h", -90 * MINUTE),
        ("1h30m", 90 * MINUTE),
        ("300ms", 300 * MILLISECOND),
        ("2us", 2 * MICROSECOND),
        ("2\u00b5s", 2 * MICROSECOND),
        (".5s", 500 * MILLISECOND),
        ("1.s", SECOND),
        ("+10ns", 10),
    ],
)
def test_parse_is_gos_parse_duration(text: str, nanos: int) -> None:
    assert durations.parse(text) == nanos


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", 'time: invalid duration ""'),
        ("5", 'time: missing unit in duration "5"'),
        ("7d", 'time: unknown unit "d" in duration "7d"'),
        (".s", 'time: invalid duration ".s"'),
        ("-", 'time: invalid duration "-"'),
    ],
)
def test_parse_refuses_with_gos_text(text: str, error: str) -> None:
    with pytest.raises(ValueError) as e:
        durations.parse(text)
    assert str(e.value) == error


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0s"),
        (HOUR, "1h0m0s"),
        (1500 * MILLISECOND, "1.5s"),
        (100 * MILLISECOND, "100ms"),
        (-2 * MINUTE, "-2m0s"),
    ],
)
def test_format_is_gos_duration_string(nanos: int, text: str) -> None:
    assert durations.format(nanos) == text
    assert durations.parse(text) == nanos


def test_seconds_takes_numbers_go_durations_and_days() -> None:
    cases = ("5s", "500ms", "2m", "1h30m", "1.5", "0.25s", "7d", "1d12h", "0")
    assert [durations.seconds(t) for t in cases] == [
        5.0,
        0.5,
        120.0,
        5400.0,
        1.5,
        0.25,
        604800.0,
        129600.0,
        0.0,
    ]
    for bad in ("5 seconds", "7 days", "s", ""):
        with pytest.raises(ValueError, match="is not a duration like 500ms, 5s or 2m"):
            durations.seconds(bad)


def test_go_writes_seconds_for_consul() -> None:
    assert [durations.go(s) for s in (1.0, 0.25, 0.6, 90.0)] == ["1s", "250ms", "600ms", "1m30s"]
    assert durations.go(0) == "1ms"  # Consul takes no zero interval
