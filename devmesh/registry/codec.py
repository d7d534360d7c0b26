"""Go-compatible wire formats: durations, request decoding and response rendering.

Consul decodes request bodies with Go's ``encoding/json`` and ``DisallowUnknownFields``
(``lib/json.go``): the body is one JSON value, read as Go reads it (``devmesh.registry.gojson``:
Go's syntax errors, 10000 levels of nesting at most); keys match struct fields exactly or
case-insensitively, an unknown key is rejected with ``json: unknown field "X"``, and ``null``
leaves a field at its zero value (an element of a slice or map: the element type's zero value).
Integer fields take integer literals in range only (``strconv.ParseInt``/``ParseUint``), and
type errors quote the number as written. Durations follow Go's ``time.ParseDuration`` (which
refuses what overflows int64) and ``time.Duration.String``; a numeric duration is a float64
converted as amd64 converts it. A struct with its own ``UnmarshalJSON`` that calls plain
``json.Unmarshal`` (``structs.Session``) ignores unknown keys instead: decode it with
``allow_unknown=True``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from devmesh.registry.gojson import JSONError, Number, read_value
from epoxi import durations

INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)

# --- request decoding -------------------------------------------------------------------------


class DecodeError(Exception):
    """A body Go's decoder would refuse; ``str()`` is Go's error text."""


@dataclass(frozen=True)
class ListOf:
    item: Kind


@dataclass(frozen=True)
class MapOf:
    value: Kind


@dataclass(frozen=True)
class Struct:
    """A Go struct: field names in declaration order, each with its kind."""

    go_name: str
    fields: tuple[tuple[str, Kind], ...]


# "str", "int", "uint", "bool", "duration" (string or number of nanoseconds), "any".
Kind = str | ListOf | MapOf | Struct

_GO_TYPES = {"str": "string", "int": "int", "uint": "uint64", "bool": "bool"}
_ZERO: dict[str, Any] = {"str": "", "int": 0, "uint": 0, "bool": False}


def go_duration(text: str) -> int:
    """``time.ParseDuration``: nanoseconds, or ValueError with Go's text (overflow included)."""
    value = durations.parse(text)
    if not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"time: invalid duration {durations.go_quote(text)}")
    return value


def go_int64(number: float) -> int:
    """``int64(f)`` on amd64: truncated, and the most negative int64 when out of range."""
    if INT64[0] <= number < 2**63:
        return int(number)
    return INT64[0]


def wrap_int64(value: int) -> int:
    """``value`` as int64 arithmetic leaves it (two's complement wrap-around)."""
    return (value - INT64[0]) % 2**64 + INT64[0]


def float64_of(value: int | float, field: str) -> float:
    """A JSON number decoded into ``interface{}`` (a float64), as an aux struct's ``field`` takes it."""
    number = float(value)
    if math.isinf(number):  # strconv.ParseFloat: out of range
        raise DecodeError(
            f"json: cannot unmarshal number {_literal(value)} into Go struct field .{field} of type float64"
        )
    return number


def _literal(value: object) -> str:
    return value.literal if isinstance(value, Number) else str(value)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _go_type(kind: Kind) -> str:
    if isinstance(kind, str):
        return _GO_TYPES.get(kind, "interface {}")
    if isinstance(kind, ListOf):
        return "[]" + _go_type(kind.item)
    if isinstance(kind, MapOf):
        return "map[string]" + _go_type(kind.value)
    return "structs." + kind.go_name


def _mismatch(value: object, kind: Kind, where: str) -> DecodeError:
    shown = _json_type(value)
    if shown == "number" and kind in ("int", "uint"):  # the literal, as strconv saw it
        shown = f"number {_literal(value)}"
    return DecodeError(
        f"json: cannot unmarshal {shown} into Go struct field {where} of type {_go_type(kind)}"
    )


def _zero(kind: Kind) -> Any:
    """What Go leaves in an element that JSON gives as ``null``."""
    if isinstance(kind, Struct):
        return {}
    return _ZERO.get(kind) if isinstance(kind, str) else None


def _element(value: object, kind: Kind, where: str, allow_unknown: bool) -> Any:
    return _zero(kind) if value is None else _decode(value, kind, where, allow_unknown)


def _decode(value: object, kind: Kind, where: str, allow_unknown: bool) -> Any:
    if value is None:
        return None
    if isinstance(kind, Struct):
        if not isinstance(value, dict):
            raise _mismatch(value, kind, where)
        return decode_struct(value, kind, allow_unknown)
    if isinstance(kind, ListOf):
        if not isinstance(value, list):
            raise _mismatch(value, kind, where)
        return [_element(item, kind.item, where, allow_unknown) for item in value]
    if isinstance(kind, MapOf):
        if not isinstance(value, dict):
            raise _mismatch(value, kind, where)
        return {str(k): _element(item, kind.value, where, allow_unknown) for k, item in value.items()}
    if kind == "any":
        return value
    if kind == "duration":
        if isinstance(value, str):
            try:
                return go_duration(value)
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return go_int64(float64_of(value, where.rpartition(".")[2]))
        return None  # Consul decodes into interface{} and ignores other types
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind in ("int", "uint") and isinstance(value, int) and not isinstance(value, bool):
        low, high = INT64 if kind == "int" else UINT64
        if not low <= value <= high:
            raise _mismatch(value, kind, where)
        return value
    raise _mismatch(value, kind, where)


def _field_for(key: str, struct: Struct) -> tuple[str, Kind] | None:
    for name, kind in struct.fields:
        if name == key:
            return name, kind
    folded = key.casefold()
    for name, kind in struct.fields:
        if name.casefold() == folded:
            return name, kind
    return None


def decode_struct(value: dict[str, object], struct: Struct, allow_unknown: bool = False) -> dict[str, Any]:
    """Decode one JSON object into ``{FieldName: value}``, the way Go fills a struct."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = _field_for(key, struct)
        if field is None:
            if allow_unknown:
                continue
            raise DecodeError(f"json: unknown field {durations.go_quote(key)}")
        name, kind = field
        decoded = _decode(item, kind, f"{struct.go_name}.{name}", allow_unknown)
        if decoded is not None or isinstance(kind, ListOf | MapOf):
            out[name] = decoded  # null empties a slice or map, and leaves other fields alone
    return out


def decode_body(raw: bytes, struct: Struct, allow_unknown: bool = False) -> dict[str, Any]:
    """Decode a request body like Consul's ``decodeBody`` (one JSON value; trailing data ignored)."""
    try:
        value = read_value(raw)
    except JSONError as exc:
        raise DecodeError(str(exc)) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError(
            f"json: cannot unmarshal {_json_type(value)} into Go value of type structs.{struct.go_name}"
        )
    return decode_struct(value, struct, allow_unknown)


# --- response rendering -----------------------------------------------------------------------

_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def render_json(value: object) -> bytes:
    """JSON as a dev-mode agent writes it: ``json.MarshalIndent`` with four spaces and a newline."""
    text = json.dumps(value, indent=4, ensure_ascii=False).translate(_GO_ESCAPES)
    return (text + "\n").encode()
