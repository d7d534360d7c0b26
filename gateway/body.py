"""Request bodies as JSON documents, refused with a reason before protobuf sees them.

A body must be UTF-8 JSON (RFC 8259) and nest at most ``MAX_DEPTH`` levels: protobuf's
``json_format`` limit, which no deeper document could pass anyway. It must not repeat a key
(protobuf's own ``json_format.Parse`` and Go's ``protojson``, which grpc-gateway uses, refuse
that too) nor use ``NaN`` or ``Infinity`` literals, which are not JSON (a float field takes
them as strings, ``"NaN"``). Checking the depth first keeps Python's parser far from its
recursion limit, whatever the body.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

MAX_DEPTH = 100  # json_format.ParseDict's default max_recursion_depth

_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Each bracket's change of depth, by byte value.
_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))
# Python's int() refuses longer digit strings (sys.get_int_max_str_digits).
_MAX_INT_DIGITS = 4300


class InvalidJSON(ValueError):
    """The body is not a JSON document the gateway accepts; ``str()`` says why."""


def parse(body: bytes) -> Any:
    """The JSON value of ``body``; InvalidJSON with the reason when there is none."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJSON(
            f"request body is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    if depth(body) > MAX_DEPTH:
        raise InvalidJSON(f"request body nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_int)
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"request body is not valid JSON: {e}") from None


def depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body`` (brackets inside strings do not count)."""
    brackets = _STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidJSON(f"request body repeats the key {key!r}")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise InvalidJSON(f'request body is not valid JSON: {name} is not a JSON value (quote it: "{name}")')


def _int(digits: str) -> int | float:
    # Too long for any integer field: as a float it is infinite, which every field refuses.
    return int(digits) if len(digits) < _MAX_INT_DIGITS else float(digits)
