"""Durations as Go writes them (Consul's API and our flags): ``500ms``, ``5s``, ``1h30m``.

``parse`` and ``format`` are Go's ``time.ParseDuration`` and ``time.Duration.String``, error
texts included, in integer nanoseconds. ``seconds`` is what a setting takes: a bare number of
seconds (``1.5``) or a Go duration, with ``d`` for days (``7d``) as the one extension.
"""

from __future__ import annotations

import json
import re

NANOSECOND = 1
MICROSECOND = 1000 * NANOSECOND
MILLISECOND = 1000 * MICROSECOND
SECOND = 1000 * MILLISECOND
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

_GO_UNITS = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,
    "\u03bcs": MICROSECOND,
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}
_SETTING_UNITS = {**_GO_UNITS, "d": DAY}
_NUMBER = re.compile(r"(\d*)(?:\.(\d*))?")
_UNIT = re.compile(r"[^\d.]*")


def go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` for the printable strings that appear in error messages."""
    return json.dumps(text, ensure_ascii=False)


def parse(text: str) -> int:
    """Go's ``time.ParseDuration``: nanoseconds, or ``ValueError`` with Go's text."""
    return _parse(text, _GO_UNITS)


def _parse(text: str, units: dict[str, int]) -> int:
    invalid = ValueError(f"time: invalid duration {go_quote(text)}")
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise invalid
    total = 0
    while rest:
        number = _NUMBER.match(rest)
        assert number is not None  # the pattern also matches the empty string
        whole, fraction = number.group(1), number.group(2)
        if not whole and not fraction:
            raise invalid
        rest = rest[number.end() :]
        unit_text = _UNIT.match(rest)
        unit_name = unit_text.group(0) if unit_text else ""
        if not unit_name:
            raise ValueError(f"time: missing unit in duration {go_quote(text)}")
        if unit_name not in units:
            raise ValueError(f"time: unknown unit {go_quote(unit_name)} in duration {go_quote(text)}")
        unit = units[unit_name]
        rest = rest[len(unit_name) :]
        value = int(whole or "0") * unit
        if fraction:
            value += int(fraction) * unit // 10 ** len(fraction)
        total += value
    return -total if negative else total


def _decimal(value: int, places: int) -> str:
    whole, fraction = divmod(value, 10**places)
    digits = str(fraction).rjust(places, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def format(nanos: int) -> str:
    """Go's ``time.Duration.String`` (``1h0m0s``, ``1.5s``, ``100ms``, ``0s``)."""
    if nanos == 0:
        return "0s"
    magnitude = abs(nanos)
    if magnitude < MICROSECOND:
        text = f"{magnitude}ns"
    elif magnitude < MILLISECOND:
        text = _decimal(magnitude, 3) + "\u00b5s"
    elif magnitude < SECOND:
        text = _decimal(magnitude, 6) + "ms"
    else:
        seconds = _decimal(magnitude % MINUTE, 9) + "s"
        minutes = magnitude // MINUTE
        if minutes == 0:
            text = seconds
        else:
            hours, minutes = divmod(minutes, 60)
            text = (f"{hours}h" if hours else "") + f"{minutes}m" + seconds
    return "-" + text if nanos < 0 else text


def seconds(text: str) -> float:
    """Seconds in ``"1.5"``, ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h30m"`` or ``"7d"``; ValueError otherwise."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return _parse(text, _SETTING_UNITS) / SECOND
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 500ms, 5s or 2m") from None


def go(seconds: float) -> str:
    """``seconds`` written for Consul: ``1.0`` → ``"1s"``, ``0.25`` → ``"250ms"``, ``90`` → ``"1m30s"``."""
    return format(max(MILLISECOND, round(seconds * 1e9)))
