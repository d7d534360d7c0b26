"""Go-compatible wire formats: durations, request decoding and response rendering.

Consul decodes request bodies with Go's ``encoding/json`` and ``DisallowUnknownFields``
(``lib/json.go``): keys match struct fields exactly or case-insensitively, an unknown key is
rejected with ``json: unknown field "X"``, and ``null`` leaves a field at its zero value.
Durations follow Go's ``time.ParseDuration`` and ``time.Duration.String``. A struct with its own
``UnmarshalJSON`` that calls plain ``json.Unmarshal`` (``structs.Session``) ignores unknown keys
instead: decode it with ``allow_unknown=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from epoxi import durations

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
    if shown == "number":
        shown = f"number {value}"
    return DecodeError(
        f"json: cannot unmarshal {shown} into Go struct field {where} of type {_go_type(kind)}"
    )


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
        return [_decode(item, kind.item, where, allow_unknown) for item in value]
    if isinstance(kind, MapOf):
        if not isinstance(value, dict):
            raise _mismatch(value, kind, where)
        return {str(key): _decode(item, kind.value, where, allow_unknown) for key, item in value.items()}
    if kind == "any":
        return value
    if kind == "duration":
        if isinstance(value, str):
            try:
                return durations.parse(value)
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
        return None  # Consul decodes into interface{} and ignores other types
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind in ("int", "uint") and isinstance(value, int | float) and not isinstance(value, bool):
        if value != int(value) or (kind == "uint" and value < 0):
            raise _mismatch(value, kind, where)
        return int(value)
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


def _syntax_error(raw: str, exc: json.JSONDecodeError) -> DecodeError:
    if exc.pos >= len(raw.rstrip()):
        return DecodeError("unexpected EOF")
    char = raw[exc.pos]
    return DecodeError(f"invalid character {char!r} looking for beginning of value")


def decode_body(raw: bytes, struct: Struct, allow_unknown: bool = False) -> dict[str, Any]:
    """Decode a request body like Consul's ``decodeBody`` (one JSON value; trailing data ignored)."""
    text = raw.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if not stripped:
        raise DecodeError("EOF")
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError as exc:
        raise _syntax_error(stripped, exc) from None
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
